"""Attacks are classes registered once: evaluation and the CLI read the registry."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch
from robust_task import quadrant_set, trained_model_folder

import apudae_engine.evaluation.run as evaluation
from apudae_engine.cli import main
from apudae_engine.evaluation.attacks import (
    DEFENSE_AWARE_ATTACKS,
    LIBRARY_ATTACKS,
    Attack,
    AttackSpec,
    attack_class,
    base,
    run_attack,
)
from apudae_engine.evaluation.config import EvalConfig


@pytest.fixture
def registry(monkeypatch):
    """A copy of the registry, so classes defined by a test vanish after it."""
    monkeypatch.setattr(base, "REGISTRY", dict(base.REGISTRY))


def _sign_noise_attack():
    class SignNoise(Attack, name="sign-noise", label="random sign"):
        """Every pixel moved by +-eps at random: the smallest possible attack."""

        quick_steps = 1

        def forward(self, images, labels):
            gen = torch.Generator().manual_seed(self.spec.seed)
            sign = torch.randint(0, 2, images.shape, generator=gen).float() * 2 - 1
            self.budget = self.new_budget(images.shape[0], classifier_forward=0)
            return images + 2 * self.spec.eps * sign  # run() projects back onto the ball

    return SignNoise


def test_every_builtin_attack_is_registered_once_with_its_family():
    assert LIBRARY_ATTACKS == ("fgsm", "rfgsm", "pgd", "pgd-l2", "cw-l2", "deepfool",
                               "autoattack")
    assert DEFENSE_AWARE_ATTACKS == ("pgd-eot", "bpda", "bpda-dae", "below-mu", "apgd-ce",
                                     "apgd-dlr", "apgd-bpda", "apgd-bpda-dae", "apgd-below-mu",
                                     "aware-suite", "apgd-detector")
    assert {attack_class(n).norm for n in ("pgd-l2", "cw-l2", "deepfool")} == {"L2"}
    assert all(attack_class(n).defense_aware for n in DEFENSE_AWARE_ATTACKS)
    assert not any(attack_class(n).defense_aware for n in LIBRARY_ATTACKS)


def test_a_name_cannot_be_registered_twice(registry):
    with pytest.raises(TypeError, match="'pgd' is registered twice"):
        class Again(Attack, name="pgd"):
            pass


def test_a_new_attack_is_one_class(registry, monkeypatch, tmp_path, capsys, caplog):
    cls = _sign_noise_attack()
    x = quadrant_set(6, seed=2)
    images, labels = x.float_images(), x.labels
    result = run_attack(AttackSpec("sign-noise", eps=0.05), torch.nn.Flatten(), images, labels)
    assert (result.images - images).abs().max() <= 0.05 + 1e-6
    assert result.budget.attack == "sign-noise" and result.budget.images == 6
    # torchattacks style: constructor keywords, then a call returning images.
    adv = cls(torch.nn.Flatten(), eps=0.05)(images, labels)
    torch.testing.assert_close(adv, result.images)

    config = EvalConfig()
    assert config.attacks[-1] == "sign-noise" and "sign-noise" not in config.aware_attacks
    assert EvalConfig(quick=True).resolved().attack_spec("sign-noise").steps == 1

    assert main(["evaluate", "--list-attacks"]) == 0
    listing = capsys.readouterr().out
    assert "sign-noise" in listing and "random sign" in listing and "pgd-eot" in listing

    caplog.set_level(logging.INFO)
    data = quadrant_set(8, seed=1)
    monkeypatch.setattr(evaluation, "load_dataset", lambda name, split, root=None, shape=None: data)
    out = tmp_path / "ev"
    assert main(["evaluate", "--model", str(trained_model_folder()), "--quick", "--limit", "8",
                 "--attacks", "sign-noise", "--aware-attacks", "none", "--defenses", "none",
                 "--sweep", "none", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["oblivious"]) == ["clean", "noise", "sign-noise"]
    # Progress without a terminal: a log line per attack row with its timings.
    lines = [r.getMessage() for r in caplog.records if "s into the batch" in r.getMessage()]
    assert [line.split(":")[0] for line in lines] == [
        "oblivious clean", "oblivious noise", "oblivious sign-noise (Linf 0.1)"]
    assert "images 1-8 of 8, attack " in lines[-1]
    assert "| random sign (L∞ 0.1) |" in (out / "results.md").read_text()


def test_an_attack_left_out_of_the_default_run_is_still_selectable(registry):
    cls = _sign_noise_attack()
    cls.in_default_run = False
    assert "sign-noise" not in EvalConfig().attacks
    assert EvalConfig(attacks=("sign-noise",)).attacks == ("sign-noise",)


def test_evaluate_help_does_not_import_torch():
    code = ("import sys; from apudae_engine.cli import main\n"
            "try:\n    main(['evaluate', '--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "--list-attacks" in res.stdout
