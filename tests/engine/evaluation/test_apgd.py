"""APGD against the purifier: best-so-far, early stop, budgets, the schedule, DLR, seeds."""

from __future__ import annotations

import pytest
import torch
from robust_task import load_trained, quadrant_set
from torch import nn

from apudae_engine import Purifier
from apudae_engine.evaluation.attacks import AttackSpec, attack_class, run_attack
from apudae_engine.evaluation.attacks.apgd import (
    APGDCE,
    attack_seed,
    checkpoint_schedule,
    selection_seeds,
)
from apudae_engine.evaluation.attacks.aware import ATTACK_SEED_SPACE, held_out_seeds
from apudae_engine.evaluation.attacks.base import dlr_loss
from apudae_engine.method.config import PurifyConfig
from apudae_engine.method.models import REDNet

EPS = 0.1


class Brightness(nn.Module):
    """Two classes: 1 when the mean pixel exceeds ``threshold``, else 0."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = 50.0 * (x.flatten(1).mean(1) - self.threshold)
        return torch.stack([-s, s], dim=1)


class Constant(nn.Module):
    """Always predicts class 0 of three, whatever the image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.flatten(1).sum(1, keepdim=True) * 0.0
        return torch.cat([z + 1.0, z - 1.0, z - 2.0], dim=1)


def identity_purifier() -> Purifier:
    """An adaptive purifier that leaves images alone: no noise, mu far above every error."""
    torch.manual_seed(0)
    return Purifier(REDNet(channels=1, layers=2, width=4).eval(), 1e6, 1.0,
                    PurifyConfig(noise=False))


def test_dlr_loss_on_a_known_case():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0], [3.0, 1.0, 2.0, 0.0]])
    # label 0 is the top class: -(3 - 2) / (3 - 1); label 2 is not: -(2 - 3) / (3 - 1).
    torch.testing.assert_close(dlr_loss(logits, torch.tensor([0, 2])),
                               torch.tensor([-0.5, 0.5]))
    # Invariant to shifting and scaling the logits.
    torch.testing.assert_close(dlr_loss(4 * logits + 7, torch.tensor([0, 2])),
                               torch.tensor([-0.5, 0.5]))


def test_checkpoints_follow_croce_and_hein():
    # First at 22 % of the steps, then intervals shrinking by 3 % down to 6 %.
    assert checkpoint_schedule(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoint_schedule(1) == [1]


def test_attack_seeds_never_meet_the_held_out_seeds():
    held = set(held_out_seeds(8))
    assert all(s >= ATTACK_SEED_SPACE for s in held)
    used = {attack_seed(b, stream, i) for b in range(0, 8 * 7919, 7919) for stream in (1, 2, 3)
            for i in range(2000)}
    assert all(s < ATTACK_SEED_SPACE for s in used) and not used & held
    pur = identity_purifier()
    assert selection_seeds(pur, 0, 4)[0] == pur.config.seed  # the defense's seed first


class Misled(APGDCE, name="test-misled"):
    """A gradient that leads to a misclassified iterate at step 1, then back to the start."""

    def objective(self, adv, y, step, restart):
        n = adv.shape[0]
        self._count(n, purifier_forward=1, purifier_backward=1, classifier_forward=1,
                    classifier_gradients=1)
        sign = 1.0 if step == 0 else -1.0  # up once, then always down
        loss = torch.full((n,), float(-step), dtype=adv.dtype)  # falls: no best-loss pull
        return loss, torch.full_like(adv, sign), torch.ones(n, dtype=torch.bool)


def test_best_so_far_keeps_the_misclassified_iterate():
    # Images at brightness 0.45 are class 0; one step of +2 eps (clipped to eps) crosses 0.5.
    x = torch.full((3, 1, 8, 8), 0.45)
    y = torch.zeros(3, dtype=torch.int64)
    attack = Misled(Brightness(0.5), purifier=identity_purifier(), eps=EPS, steps=10, eot=1)
    try:
        adv = attack(x, y)
    finally:
        from apudae_engine.evaluation.attacks.base import REGISTRY
        REGISTRY.pop("test-misled")
    with torch.no_grad():
        assert (Brightness(0.5)(adv).argmax(1) == 1).all()  # the fooled iterate, kept
    assert (attack.correct_draws == 0).all()
    # ...and the attack stopped right after finding it: start + first step, no more.
    assert attack.budget.settings["iterations_count"] == 2 * 3


def test_budgets_count_every_pass_when_nothing_falls():
    # A constant classifier is never fooled: every image runs every step.
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(5, dtype=torch.int64)
    steps, eot, n = 6, 3, 5
    result = run_attack(AttackSpec("apgd-ce", eps=EPS, steps=steps, eot=eot, draws=4),
                        Constant(), x, y, identity_purifier())
    b = result.budget
    iterations = steps + 1  # the random start, then one per step
    assert b.settings["iterations_count"] == n * iterations
    assert b.purifier_backward == b.classifier_gradients == n * iterations * eot
    # + one check of the clean image on the defense's seed (never fooled: no other draw).
    assert b.purifier_forward == b.classifier_forward == n * iterations * eot + n
    assert b.dae_forward == b.dae_backward == 0
    assert b.to_dict()["per_image"]["purifier_backward"] == iterations * eot
    assert (perturbation := (result.images - x).abs().amax()) <= EPS + 1e-6, perturbation


def test_early_stop_skips_images_already_fooled():
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 0, 1, 1, 0])  # Constant says 0: the 1s are wrong from the start
    result = run_attack(AttackSpec("apgd-dlr", eps=EPS, steps=5, eot=2, draws=3), Constant(),
                        x, y, identity_purifier())
    s = result.budget.settings
    assert s["iterations_count"] == 3 * 6  # only the three class-0 images were attacked
    assert s["fooled_on_all_draws_count"] == 3
    torch.testing.assert_close(result.images[y == 1], x[y == 1])  # left as they were


@pytest.fixture(scope="module")
def task():
    torch.set_num_threads(1)
    classifier, dae_ckpt = load_trained()
    cal = dae_ckpt.calibration
    purifier = Purifier(dae_ckpt.model, cal["mu"], cal["sigma"], PurifyConfig())
    data = quadrant_set(64)
    return classifier, purifier, data.float_images()[:12], data.labels[:12]


@pytest.mark.parametrize("name", ["apgd-ce", "apgd-dlr", "apgd-bpda", "apgd-bpda-dae",
                                  "apgd-below-mu", "aware-suite"])
def test_apgd_attacks_fool_the_undefended_task_within_eps(task, name):
    classifier, purifier, x, y = task
    spec = AttackSpec(name, eps=EPS, steps=5, eot=2, draws=2)
    attack = spec.build(classifier, purifier)
    result = attack.run(x, y)
    assert (result.images - x).abs().amax() <= EPS * (1 + 1e-5)
    assert result.images.min() >= 0 and result.images.max() <= 1
    assert attack.correct_draws.shape == (12,)
    # Images fooled on every selection draw are misclassified on the defense's own seed.
    with torch.no_grad():
        pred = classifier(purifier(result.images)).argmax(1)
    assert (pred[attack.correct_draws == 0] != y[attack.correct_draws == 0]).all()
    assert (attack.correct_draws == 0).float().mean() >= 0.5  # the fixture DAE defends nothing
    assert result.budget.images == 12


def test_suite_runs_later_members_only_on_survivors(task):
    classifier, purifier, x, y = task
    result = run_attack(AttackSpec("aware-suite", eps=EPS, steps=3, eot=1, draws=2), classifier,
                        x, y, purifier)
    s = result.budget.settings
    attacked = [s[f"{m}_images_count"] for m in attack_class("aware-suite").members
                if f"{m}_images_count" in s]
    fooled = [s[f"{m}_fooled_count"] for m in attack_class("aware-suite").members
              if f"{m}_images_count" in s]
    assert attacked[0] == 12
    for i in range(1, len(attacked)):
        assert attacked[i] == attacked[i - 1] - fooled[i - 1]


def test_suite_returns_an_attacked_image_even_where_nothing_falls():
    # Nothing fools a constant classifier; the suite still returns the first member's
    # highest-loss iterate (held-out draws score that), not the clean image.
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    y = torch.zeros(3, dtype=torch.int64)
    attack = attack_class("aware-suite")(Constant(), purifier=identity_purifier(), eps=EPS,
                                         steps=2, eot=1, draws=2)
    adv = attack(x, y)
    assert (attack.correct_draws == 2).all()
    assert ((adv - x).flatten(1).abs().amax(1) > 0).all()
