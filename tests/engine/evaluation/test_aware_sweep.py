"""evaluate --aware-sweep: a defense-aware point per eps and target, the detect-and-reject
columns, the curve and its plot, and parts that runs over part of a curve share."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from robust_task import quadrant_set, trained_model_folder

import apudae_engine.evaluation.run as evaluation
from apudae_engine.core.errors import UserError
from apudae_engine.evaluation.config import EvalConfig
from apudae_engine.evaluation.run import evaluate

SWEEP = (0.05, 0.1)
TARGETS = ("none", "direct", "adaptive")
ATTACKS = ("aware-suite", "apgd-detector")


def _config(out, **kw) -> EvalConfig:
    settings = dict(model=str(trained_model_folder()), quick=True, limit=16, attacks=(),
                    sweep=(), aware_limit=8, aware_attacks=ATTACKS, aware_sweep=SWEEP,
                    defenses=("none", "direct", "adaptive"), aware_batch_size=4, out_dir=str(out),
                    command="test")
    return EvalConfig(**{**settings, **kw})


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("aware-sweep")
    data = quadrant_set(48, seed=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluation, "load_dataset", lambda name, split, root=None, shape=None: data)
        results = evaluate(_config(out))
    return results, out, data


def test_every_target_gets_a_point_per_eps_in_its_own_column(sweep):
    results, out, _ = sweep
    curves = results["aware_sweep"]
    assert curves["eps"] == list(SWEEP) and list(curves["targets"]) == list(TARGETS)
    assert "defense_aware" not in results  # the curve's tables replace the single-eps one
    for target in TARGETS:
        for eps in SWEEP:
            assert (out / "parts" / f"aware-{target}-eps{eps:g}-b000001.npz").exists()
        points = curves["targets"][target]
        assert [p["eps"] for p in points] == list(SWEEP)
        assert all(set(p["rows"]) == set(ATTACKS) and p["n"] == 8 for p in points)
    text = (out / "results.md").read_text()
    assert "Defense-aware curves" in text and "### Against direct DAE" in text
    assert (out / "aware_vs_eps.png").stat().st_size > 0


def test_rejection_columns_recompute_from_the_per_image_outcomes(sweep):
    results, out, _ = sweep
    threshold = results["settings"]["calibration"]["flag_threshold"]
    per_image = np.load(out / "per_image.npz")
    k = results["settings"]["draws"]
    clean_r = per_image["oblivious/clean/error"]
    clean = results["aware_sweep"]["clean"]
    assert clean["rejected"] == pytest.approx(float((clean_r > threshold).mean()), abs=1e-4)
    for target, points in results["aware_sweep"]["targets"].items():
        for p in points:
            key = f"aware-{target}-eps{p['eps']:g}"
            flagged = {a: per_image[f"{key}/{a}/error"] > threshold for a in ATTACKS}
            correct = {a: per_image[f"{key}/{a}/correct/{target}"] for a in ATTACKS}
            draws = {a: per_image[f"{key}/{a}/draws"] for a in ATTACKS}
            for a in ATTACKS:
                row = p["rows"][a]["rejection"]
                assert row["flagged"] == pytest.approx(flagged[a].mean(), abs=1e-4)
                assert row["seed"] == pytest.approx((correct[a] | flagged[a]).mean(), abs=1e-4)
                ok = np.where(flagged[a], k, draws[a])
                assert row["all"] == pytest.approx((ok == k).mean(), abs=1e-4)
            # The point is the per-image worst case over the attacks, with rejection too.
            worst = np.all([correct[a] | flagged[a] for a in ATTACKS], axis=0)
            assert p["rejection"]["seed"] == pytest.approx(worst.mean(), abs=1e-4)
            assert p["seed"] == pytest.approx(np.all([correct[a] for a in ATTACKS], axis=0)
                                              .mean(), abs=1e-4)
            lo, hi = p["ci95"]["mean"]
            assert lo <= p["mean"] <= hi


def test_the_detector_aware_rows_pass_the_detector(sweep):
    results, out, _ = sweep
    threshold = results["settings"]["calibration"]["flag_threshold"]
    per_image = np.load(out / "per_image.npz")
    clean_ok = per_image["oblivious/clean/error"][:8] <= threshold
    for target in TARGETS:
        for eps in SWEEP:
            r = per_image[f"aware-{target}-eps{eps:g}/apgd-detector/error"]
            assert (r[clean_ok] <= threshold).all(), (target, eps)


def test_a_run_over_part_of_the_curve_reuses_the_parts(sweep, monkeypatch):
    _, out, data = sweep
    monkeypatch.setattr(evaluation, "load_dataset", lambda name, split, root=None, shape=None: data)
    part = evaluate(_config(out, aware_sweep=(0.1,), aware_targets=("adaptive",)))
    assert part["settings"]["parts"]["computed_by_this_process"] == 0
    whole = json.loads((out / "results.json").read_text())  # rewritten by the partial run
    assert list(whole["aware_sweep"]["targets"]) == ["adaptive"]


def test_the_sweep_settings_are_checked():
    with pytest.raises(UserError, match="--aware-sweep needs defense-aware attacks"):
        EvalConfig(aware_sweep=(0.1,), aware_attacks=())
    with pytest.raises(UserError, match="unknown attack or defense bogus"):
        EvalConfig(aware_sweep=(0.1,), aware_targets=("bogus",))
    with pytest.raises(UserError, match="--aware-targets direct must be among --defenses"):
        EvalConfig(aware_sweep=(0.1,), defenses=("none", "adaptive"))
    with pytest.raises(UserError, match="must be positive"):
        EvalConfig(aware_sweep=(0.0,))
