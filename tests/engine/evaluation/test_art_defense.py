"""APuDAE as an ART defense: ART's gradients and predictions equal the engine's own."""

from __future__ import annotations

import pytest
import torch
from robust_task import load_trained, quadrant_set

from apudae_engine import Purifier
from apudae_engine.evaluation.attacks import AttackSpec, run_attack
from apudae_engine.evaluation.attacks.aware import eot_gradient, purified_logits
from apudae_engine.method.config import PurifyConfig

pytest.importorskip("art")

from apudae_engine.evaluation.art_defense import PurificationDefense, defended_classifier  # noqa: E402


@pytest.fixture(scope="module")
def task():
    torch.set_num_threads(1)
    classifier, dae_ckpt = load_trained()
    cal = dae_ckpt.calibration
    purifier = Purifier(dae_ckpt.model, cal["mu"], cal["sigma"], PurifyConfig())
    data = quadrant_set(32, seed=3)
    return classifier, purifier, data.float_images(), data.labels


def _estimator(classifier, defense):
    return defended_classifier(classifier, defense, (1, 28, 28), 4,
                               loss=torch.nn.CrossEntropyLoss(reduction="sum"))


@pytest.mark.parametrize("gradient", ["full", "bpda", "bpda-dae"])
def test_art_loss_gradient_is_the_engines_eot_gradient(task, gradient):
    classifier, purifier, x, y = task
    x, y = x[:6], y[:6]
    defense = PurificationDefense(purifier, gradient=gradient, eot_samples=2, seed=5)
    seeds = defense.seeds_for_call(0)
    one_hot = torch.nn.functional.one_hot(y, 4).float().numpy()  # ART's label format
    art_grad = _estimator(classifier, defense).loss_gradient(x.numpy(), one_hot)
    ours = eot_gradient(gradient, classifier, purifier, x, y, seeds, "ce")
    # ART sums the loss over the 2 draws of each image; the engine averages them.
    torch.testing.assert_close(torch.from_numpy(art_grad) / 2, ours, rtol=1e-4, atol=1e-6)
    assert defense.calls == 1 and ours.abs().sum() > 0


def test_art_predict_is_one_draw_of_the_defended_classifier(task):
    classifier, purifier, x, y = task
    defense = PurificationDefense(purifier, eot_samples=4, seed=1)
    logits = _estimator(classifier, defense).predict(x.numpy())
    expected = purified_logits(classifier, purifier, x, defense.seeds_for_call(0, draws=1)[0])
    assert logits.shape == (x.shape[0], 4)
    torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=1e-5, atol=1e-5)


def test_art_pgd_through_the_defense_matches_the_suites_bpda(task):
    from art.attacks.evasion import ProjectedGradientDescentPyTorch

    classifier, purifier, x, y = task
    eps, steps = 0.1, 5
    defense = PurificationDefense(purifier, gradient="bpda", eot_samples=2)
    pgd = ProjectedGradientDescentPyTorch(_estimator(classifier, defense), eps=eps,
                                          eps_step=2.5 * eps / steps, max_iter=steps,
                                          num_random_init=1, batch_size=64, verbose=False)
    adv_art = torch.from_numpy(pgd.generate(x.numpy(), y.numpy()))
    adv_ours = run_attack(AttackSpec("bpda", eps=eps, steps=steps, eot=2), classifier, x, y,
                          purifier=purifier).images
    assert (adv_art - x).abs().max() <= eps + 1e-6
    with torch.no_grad():
        clean = (classifier(purifier(x)).argmax(1) == y).float().mean().item()
        art_acc = (classifier(purifier(adv_art)).argmax(1) == y).float().mean().item()
        our_acc = (classifier(purifier(adv_ours)).argmax(1) == y).float().mean().item()
    # Same attack, same budget, different random starts and noise draws: on the fixture (whose
    # DAE defends nothing) both break the defended model and agree within 3 of 32 images.
    assert clean == 1.0
    assert art_acc <= 0.5 and our_acc <= 0.5
    assert abs(art_acc - our_acc) <= 3 / 32


def test_the_defense_rejects_bad_settings(task):
    _, purifier, *_ = task
    with pytest.raises(ValueError, match="gradient must be one of"):
        PurificationDefense(purifier, gradient="exact")
    with pytest.raises(ValueError, match="eot_samples"):
        PurificationDefense(purifier, eot_samples=0)
