"""Attacks respect their budgets, break an undefended classifier, and differentiate correctly."""

from __future__ import annotations

import copy

import pytest
import torch
from robust_task import load_trained, quadrant_set

from apudae_engine import Purifier
from apudae_engine.evaluation.attacks import (
    LIBRARY_ATTACKS,
    AttackSpec,
    classifier_loss,
    perturbation_norm,
    run_attack,
)
from apudae_engine.evaluation.attacks.aware import eot_gradient, purified_logits
from apudae_engine.method.config import PurifyConfig
from apudae_engine.method.purification import purify, reconstruction_error

L2_EPS, LINF_EPS = 1.5, 0.1
SMALL_STEPS = {"pgd": 5, "pgd-l2": 5, "cw-l2": 10, "deepfool": 5, "autoattack": 3,
               "pgd-eot": 2, "bpda": 3, "bpda-dae": 3, "below-mu": 5}


@pytest.fixture(scope="module")
def task():
    torch.set_num_threads(1)  # the attacks are tiny; more threads only add overhead here
    classifier, dae_ckpt = load_trained()
    cal = dae_ckpt.calibration
    purifier = Purifier(dae_ckpt.model, cal["mu"], cal["sigma"], PurifyConfig())
    data = quadrant_set(64)
    return classifier, purifier, data.float_images(), data.labels


def _spec(name: str, **kw) -> AttackSpec:
    eps = L2_EPS if name in ("pgd-l2", "cw-l2", "deepfool") else LINF_EPS
    return AttackSpec(name, eps=eps, steps=SMALL_STEPS.get(name), square_queries=20, **kw)


def _check_budget(spec: AttackSpec, adv: torch.Tensor, x: torch.Tensor) -> None:
    assert adv.shape == x.shape and adv.dtype == x.dtype
    assert torch.isfinite(adv).all()
    assert adv.min() >= 0 and adv.max() <= 1
    norms = perturbation_norm(adv, x, spec.norm)
    assert norms.max() <= spec.eps * (1 + 1e-5), (spec.name, norms.max())


@pytest.mark.parametrize("name", LIBRARY_ATTACKS)
def test_library_attacks_stay_within_eps_and_range(task, name):
    pytest.importorskip("art")
    classifier, _, x, y = task
    spec = _spec(name)
    result = run_attack(spec, classifier, x[:16], y[:16])
    _check_budget(spec, result.images, x[:16])
    b = result.budget
    assert b.images == 16 and b.classifier_gradients > 0
    assert b.purifier_forward == b.purifier_backward == 0
    # Even with these small budgets every attack fools the undefended classifier (clean: 100 %;
    # under attack at most 19 %, C&W-L2 with 10 steps).
    with torch.no_grad():
        assert (classifier(x[:16]).argmax(1) == y[:16]).all()
        assert (classifier(result.images).argmax(1) == y[:16]).float().mean() <= 0.5, name


@pytest.mark.parametrize("name", ("pgd-eot", "bpda", "bpda-dae", "below-mu"))  # APGD: test_apgd
def test_defense_aware_attacks_stay_within_eps_and_count_passes(task, name):
    classifier, purifier, x, y = task
    spec = _spec(name, eot=2)
    result = run_attack(spec, classifier, x[:8], y[:8], purifier=purifier)
    _check_budget(spec, result.images, x[:8])
    # The untrained fixture DAE defends nothing: each attack fools classifier o purifier.
    with torch.no_grad():
        assert (classifier(purifier(x[:8])).argmax(1) == y[:8]).all()
        assert (classifier(purifier(result.images)).argmax(1) == y[:8]).float().mean() <= 0.5
    per = result.budget.to_dict()["per_image"]
    if name == "below-mu":
        assert per["dae_backward"] == spec.steps and per["purifier_forward"] == 0
    else:
        assert per["purifier_forward"] == spec.steps * spec.eot
        assert per["classifier_gradients"] == spec.steps * spec.eot
        assert per["purifier_backward"] == (spec.steps * spec.eot if name == "pgd-eot" else 0)


def test_rfgsm_is_clamped_to_eps_unlike_the_authors_code(task):
    pytest.importorskip("art")
    classifier, _, x, y = task
    spec = AttackSpec("rfgsm", eps=0.05)
    adv = run_attack(spec, classifier, x, y).images
    linf = perturbation_norm(adv, x, "Linf")
    assert linf.max() <= 0.05 + 1e-6 and linf.max() > 0.04


def test_undefended_classifier_falls_to_pgd_while_clean_accuracy_holds(task):
    pytest.importorskip("art")
    classifier, _, x, y = task
    with torch.no_grad():
        clean = (classifier(x).argmax(1) == y).float().mean().item()
    adv = run_attack(AttackSpec("pgd", eps=LINF_EPS, steps=10), classifier, x, y).images
    with torch.no_grad():
        robust = (classifier(adv).argmax(1) == y).float().mean().item()
    assert clean >= 0.9
    assert robust <= 0.05


def test_autoattack_uses_the_original_step_counts(task):
    pytest.importorskip("art")
    from apudae_engine.evaluation.attacks.library import AutoAttack, CountedModel, art_classifier

    classifier, *_ = task
    estimator = art_classifier(CountedModel(classifier), (1, 28, 28), 10)
    attack, settings = AutoAttack(classifier, eps=LINF_EPS).library_attack(estimator, 10)
    apgd, apgdt, square = attack.attacks
    assert apgd.max_iter == apgdt.max_iter == 100
    assert apgd.loss_type == "cross_entropy" and not apgd.targeted
    assert apgdt.loss_type == "difference_logits_ratio" and apgdt.targeted
    assert attack.target_classes == settings["target_classes"] == 9
    assert square.max_iter == 5000
    assert all(a.nb_random_init == 1 for a in (apgd, apgdt)) and square.nb_restarts == 1
    assert settings["apgd_steps"] == 100
    # ART has no FAB: the record says the standard version ran without FAB-T.
    assert settings["version"] == "standard without FAB-T" and "left out" in settings["fab"]


def test_attack_spec_validates():
    with pytest.raises(ValueError, match="unknown attack"):
        AttackSpec("bim", eps=0.1)
    with pytest.raises(ValueError, match="eps"):
        AttackSpec("pgd", eps=0)
    assert AttackSpec("pgd-l2", eps=1.0).norm == "L2"
    assert AttackSpec("pgd", eps=0.1, steps=10).step_size == pytest.approx(0.025)


def test_defense_aware_attack_needs_a_purifier(task):
    classifier, _, x, y = task
    with pytest.raises(ValueError, match="purifier"):
        run_attack(AttackSpec("bpda", eps=0.1), classifier, x[:2], y[:2])


def _float64(task, mu_shift: float = 0.0, noise: bool = True):
    classifier, purifier, x, y = task
    clf = copy.deepcopy(classifier).double()
    dae = copy.deepcopy(purifier.dae).double()
    pur = Purifier(dae, purifier.mu + mu_shift, purifier.sigma, PurifyConfig(noise=noise))
    return clf, pur, x.double(), y


def _direction_check(clf, pur, x, y, seeds, ids):
    """<grad, v> against a central difference of the same EOT loss along a random v."""
    g = eot_gradient("full", clf, pur, x, y, seeds, "ce", image_ids=ids)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    v /= v.norm()

    def loss(z):
        return sum(classifier_loss(purified_logits(clf, pur, z, s, ids), y, "ce").sum()
                   for s in seeds).item() / len(seeds)

    h = 1e-6
    fd = (loss(x + h * v) - loss(x - h * v)) / (2 * h)
    return (g * v).sum().item(), fd


@pytest.mark.parametrize("noise", [False, True])
def test_full_gradient_matches_finite_differences(task, noise):
    # squared_error_ref sums float64 inputs in float64: a float32 sum would swamp the central
    # difference at the small h that Adam's sign-like steps need.
    # mu far below every error: the hinge is active at every step and the noise amplitude
    # saturates at its clip (it is computed without gradient, so it must not vary under +-h).
    clf, pur, x, y = _float64(task, mu_shift=-0.4, noise=noise)
    # Interior pixels: no clamp kinks.
    gen = torch.Generator().manual_seed(5)
    x = (0.3 + 0.4 * x[:4] + 0.05 * torch.rand(x[:4].shape, generator=gen, dtype=x.dtype))
    with torch.no_grad():
        assert (reconstruction_error(pur.dae, x) > pur.mu).all()
    ids = torch.arange(4)  # fixed ids: the default (a pixel fingerprint) changes under +-h
    analytic, fd = _direction_check(clf, pur, x, y[:4], [11, 12], ids)
    assert analytic == pytest.approx(fd, rel=1e-4, abs=1e-8)


def test_full_gradient_is_finite_and_exact_when_the_hinge_never_fires(task):
    # mu far above every error: purification only adds noise, so d out / d x is the identity.
    # Through the kernels' Adam reference this gradient was NaN (sqrt'(0) * 0).
    clf, pur, x, y = _float64(task, mu_shift=1e3)
    x = 0.3 + 0.4 * x[:4]
    analytic, fd = _direction_check(clf, pur, x, y[:4], [7], torch.arange(4))
    assert analytic == pytest.approx(fd, rel=1e-4, abs=1e-8)


def test_bpda_backward_is_the_identity(task):
    classifier, purifier, x, y = task
    x, y = x[:6], y[:6]
    g = eot_gradient("bpda", classifier, purifier, x, y, [4])
    with torch.no_grad():
        xp = purify(purifier.dae, x, purifier.config.with_(seed=4), purifier.mu,
                    purifier.sigma).images
    xp.requires_grad_(True)
    (expected,) = torch.autograd.grad(classifier_loss(classifier(xp), y, "ce").sum(), xp)
    torch.testing.assert_close(g, expected)


def test_below_mu_keeps_reconstruction_error_under_mu(task):
    classifier, purifier, x, y = task
    result = run_attack(AttackSpec("below-mu", eps=LINF_EPS, steps=10), classifier, x[:16],
                        y[:16], purifier=purifier)
    with torch.no_grad():
        r = reconstruction_error(purifier.dae, result.images)
        fooled = classifier(result.images).argmax(1) != y[:16]
    found = result.budget.settings["below_mu_count"]
    # An image keeps an iterate below mu exactly when the attack found one.
    assert int((r <= purifier.mu).sum()) == found
    assert int(((r <= purifier.mu) & fooled).sum()) > 0
