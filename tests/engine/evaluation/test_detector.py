"""The detector-aware attack: it stays under the flag threshold it is given, and beats the
suite against the detect-and-reject system."""

from __future__ import annotations

import pytest
import torch
from robust_task import load_trained, quadrant_set

from apudae_engine import Purifier, PurifyConfig
from apudae_engine.evaluation.attacks import AttackSpec, attack_names, run_attack

EPS = 0.1


@pytest.fixture(scope="module")
def task():
    torch.set_num_threads(1)
    classifier, dae_ckpt = load_trained()
    cal = dae_ckpt.calibration
    data = quadrant_set(64)
    return classifier, dae_ckpt.model, cal, data.float_images()[:16], data.labels[:16]


def _system_correct(classifier, purifier, adv, y):
    """Defended by the detect-and-reject system: flagged, or classified correctly."""
    flagged = purifier.reconstruction_error(adv) > purifier.flag_threshold()
    with torch.no_grad():
        correct = classifier(purifier.purify(adv).images).argmax(1) == y
    return flagged | correct, flagged, correct


@pytest.mark.parametrize("k", [0.5, 2.0])
def test_every_image_it_returns_is_under_the_threshold_it_is_given(task, k):
    classifier, dae, cal, x, y = task
    # flag_k sets the threshold mu + k sigma: 0.5 flags some clean images of the task.
    purifier = Purifier(dae, cal["mu"], cal["sigma"], PurifyConfig(flag_k=k, seed=0))
    threshold = purifier.flag_threshold()
    assert threshold == pytest.approx(cal["mu"] + k * cal["sigma"])
    result = run_attack(AttackSpec("apgd-detector", eps=EPS, steps=10, eot=2, draws=2),
                        classifier, x, y, purifier)
    r = purifier.reconstruction_error(result.images)
    assert (r <= threshold).all(), (r.max(), threshold)
    assert (result.images - x).abs().amax() <= EPS * (1 + 1e-5)
    assert result.images.min() >= 0 and result.images.max() <= 1
    s = result.budget.settings
    assert s["threshold"] == threshold and s["under_threshold_count"] == 16
    defended, flagged, _ = _system_correct(classifier, purifier, result.images, y)
    assert not flagged.any() and defended.float().mean() <= 0.25  # the fixture DAE defends nothing


def test_it_beats_the_suite_against_detect_and_reject(task):
    classifier, dae, cal, x, y = task
    purifier = Purifier(dae, cal["mu"], cal["sigma"], PurifyConfig(flag_k=0.5, seed=0))
    assert (purifier.reconstruction_error(x) > purifier.flag_threshold()).any()
    accuracy = {}
    for name in ("apgd-detector", "aware-suite"):
        result = run_attack(AttackSpec(name, eps=EPS, steps=10, eot=2, draws=2), classifier,
                            x, y, purifier)
        accuracy[name] = _system_correct(classifier, purifier, result.images, y)[0].sum()
    # The suite ignores the detector: some of its images are flagged (rejected).
    assert accuracy["apgd-detector"] < accuracy["aware-suite"]


def test_an_input_it_cannot_bring_under_comes_back_unchanged(task):
    classifier, dae, cal, x, y = task
    # A threshold under every clean error and no budget to reach it: nothing is feasible.
    purifier = Purifier(dae, cal["mu"], cal["sigma"], PurifyConfig(flag_k=-1e3, seed=0))
    result = run_attack(AttackSpec("apgd-detector", eps=1e-4, steps=2, eot=1, draws=2),
                        classifier, x[:4], y[:4], purifier)
    torch.testing.assert_close(result.images, x[:4])
    assert result.budget.settings["under_threshold_count"] == 0


def test_it_is_in_evaluates_default_defense_aware_rows():
    assert "apgd-detector" in attack_names(defense_aware=True, default_only=True)
