"""`tune` scores settings on the calib split, follows its rule, resumes, and writes the model."""

from __future__ import annotations

import argparse
import json
import re
import shutil

import pytest
import torch
from robust_task import quadrant_set, trained_model_folder

import apudae_engine.evaluation.tune as tuning
from apudae_engine import Purifier
from apudae_engine.cli import main
from apudae_engine.cli.tune import _grid
from apudae_engine.evaluation.tune import Candidate, TuneConfig, choose, method_settings, tune

GRID = (("steps", (2, 13)), ("noise_max_scale", (16.0,)))


@pytest.fixture
def model(tmp_path, monkeypatch):
    """A writable copy of the quadrant task's model; every split is the task's images."""
    torch.set_num_threads(1)
    folder = tmp_path / "model"
    shutil.copytree(trained_model_folder(), folder)
    data = quadrant_set(24, seed=2)
    splits = []
    monkeypatch.setattr(tuning, "load_dataset",
                        lambda name, split, root=None, shape=None: splits.append(split) or data)
    return folder, splits


def _config(folder, out, **kw) -> TuneConfig:
    return TuneConfig(model=str(folder), dataset="fashion-mnist", clean_limit=24,
                      attack_limit=8, attack="apgd-ce", attack_steps=3, eot=1, draws=2,
                      grid=GRID, batch_size=8, out_dir=str(out), command="test", **kw)


def test_tune_scores_on_calib_follows_its_rule_and_writes_the_model(model, tmp_path):
    folder, splits = model
    doc = tune(_config(folder, tmp_path / "out", write=True))
    assert splits == ["calib"]
    for name in ("tune.json", "tune.md", "tune.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    cands = [Candidate(**c) for c in doc["candidates"]]
    # The method's defaults, then steps 2 (13 is the default), then the cap tried at the best.
    assert len(cands) == 3 and doc["method_defaults"]["settings"] == method_settings()
    base = Candidate(**doc["method_defaults"])
    for c in cands:
        assert 0 <= c.robust_all <= c.robust_mean <= 1 and 0 <= c.clean <= 1
    assert doc["min_gain"] > 0  # one standard error of the method's robust accuracy
    best_steps = choose(cands[:2], base, base, 0.01, doc["min_gain"])
    assert [s["kept"] for s in doc["search"]] == [
        best_steps.settings["steps"], doc["chosen"]["settings"]["noise_max_scale"]]
    chosen = Candidate(**doc["chosen"])
    assert chosen.clean >= base.clean - 0.01 - 1e-9
    meta = json.loads((folder / "dae.json").read_text())
    assert meta["purify_defaults"]["adaptive"] == doc["chosen"]["settings"]
    assert meta["purify_defaults"]["tuning"]["method_defaults"]["settings"] == method_settings()
    config = Purifier.from_pretrained(folder).config
    assert {k: getattr(config, k) for k in doc["chosen"]["settings"]} == doc["chosen"]["settings"]
    assert config.defaults == "tuned"  # written values fill the unset fields, even equal ones


def test_tune_resumes_from_the_scored_settings(model, tmp_path, monkeypatch):
    folder, _ = model
    first = tune(_config(folder, tmp_path / "out"))

    def refuse(self, settings):
        raise AssertionError(f"scored {settings} again")

    monkeypatch.setattr(tuning.Tuner, "_score", refuse)
    again = tune(_config(folder, tmp_path / "out"))
    assert again["candidates"] == first["candidates"] and again["chosen"] == first["chosen"]
    # Other tuning settings do not reuse those scores.
    with pytest.raises(AssertionError, match="scored"):
        tune(_config(folder, tmp_path / "out", eps=0.05))


def _cand(steps, clean, robust, robust_all=0.0):
    settings = {**method_settings(), "steps": steps}
    return Candidate(settings, clean, robust, robust, robust_all, 1.0, 1.0)


def test_choose_takes_the_most_robust_within_the_clean_budget_and_the_margin():
    base = _cand(13, 0.90, 0.10)
    too_costly = _cand(20, 0.88, 0.50)  # 2 points below the baseline
    fine = _cand(8, 0.895, 0.20)
    assert choose([base, too_costly, fine], base, base, 0.01, 0.0) is fine
    assert choose([base, too_costly, fine], base, base, 0.03, 0.0) is too_costly
    # Ties on robustness go to clean accuracy, then to fewer steps.
    assert choose([base, _cand(20, 0.90, 0.10)], base, base, 0.01, 0.0).settings["steps"] == 13
    # A gain below the margin keeps the current setting.
    assert choose([base, fine], base, base, 0.01, 0.15) is base
    assert choose([base, fine], base, base, 0.01, 0.10) is fine


def test_standard_error_asks_for_about_an_image_at_zero():
    assert tuning.standard_error(0.0, 128) == pytest.approx((1 / 128 * 127 / 128 / 128) ** 0.5)
    assert tuning.standard_error(0.0234, 128) == pytest.approx(0.01337, abs=1e-4)


@pytest.mark.parametrize("grid, message", [
    ((("steps", (2.5,)),), "steps must be an integer"),
    ((("steps", (5000,)),), "steps must be an integer in [1, 200]"),
    ((("lr", (0.0,)),), "lr must be a number in [1e-06, 1]"),
    ((("noise_max_scale", (1e5,)),), "noise_max_scale must be a number in [0, 10000]"),
    ((("noise_eps", (float("nan"),)),), "noise_eps must be a number"),
])
def test_grid_values_a_model_json_may_not_hold_are_refused_up_front(grid, message):
    from apudae_engine.core.errors import UserError

    with pytest.raises(UserError, match=re.escape(message)):
        TuneConfig(grid=grid)


def test_grid_option_parses_fractions_and_refuses_unknown_settings():
    assert _grid("steps=8,13; lr=1/255,2/255 ;noise_cap=16") == (
        ("steps", (8.0, 13.0)), ("lr", (1 / 255, 2 / 255)), ("noise_max_scale", (16.0,)))
    for bad in ("beta1=0.5", "steps=", "lr=a/b", "lr=1/0"):
        with pytest.raises(argparse.ArgumentTypeError):
            _grid(bad)


def test_tune_cli_refuses_a_library_attack(model, tmp_path, capsys):
    folder, _ = model
    assert main(["tune", "--model", str(folder), "--attack", "pgd", "--out",
                 str(tmp_path / "o")]) == 2
    assert "defense-aware attack" in capsys.readouterr().err


def test_evaluate_scores_the_tuned_settings_unless_told_otherwise(model, tmp_path, monkeypatch):
    import apudae_engine.evaluation.run as evaluation
    from apudae_engine.evaluation.config import EvalConfig
    from apudae_engine.method.checkpoint import update_metadata

    folder, _ = model
    update_metadata(folder / "dae.json", purify_defaults={"adaptive": {"steps": 3}})
    data = quadrant_set(16, seed=3)
    monkeypatch.setattr(evaluation, "load_dataset", lambda *a, **k: data)
    for method_defaults, steps in ((False, 3), (True, 13)):
        out = tmp_path / f"eval-{method_defaults}"
        results = evaluation.evaluate(EvalConfig(
            model=str(folder), quick=True, limit=16, attacks=(), aware_attacks=(), sweep=(),
            method_defaults=method_defaults, out_dir=str(out), command="test"))
        adaptive = results["settings"]["defenses"]["adaptive"]
        assert adaptive["steps"] == steps
        assert results["settings"]["defenses"]["adaptive-compat"]["steps"] == 13
        md = (out / "results.md").read_text()
        assert ("tuned purify_defaults" in md) is not method_defaults
