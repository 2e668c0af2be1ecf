"""`evaluate` produces the expected tables, files and errors (quick mode on a synthetic task)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from robust_task import quadrant_set, trained_model_folder

import apudae_engine.evaluation.run as evaluation
from apudae_engine.cli import main
from apudae_engine.core.errors import UserError
from apudae_engine.evaluation.attacks import LIBRARY_ATTACKS, attack_names
from apudae_engine.evaluation.config import DEFENSES, EvalConfig
from apudae_engine.evaluation.run import WORST_CASE, evaluate, roc_auc

DEFAULT_AWARE = attack_names(defense_aware=True, default_only=True)
# The quick run adds the single-attack PGD-EOT to the default suite: its budget is exact, and
# two rows give the per-image worst-case row.
QUICK_AWARE = (*DEFAULT_AWARE, "pgd-eot")

FILES = ("results.json", "results.md", "per_image.npz", "accuracy_vs_eps.png",
         "error_histogram.png", "examples.png")


@pytest.fixture
def quadrant_data(monkeypatch):
    """Every split of every dataset name is the quadrant task's held-out images."""
    torch.set_num_threads(1)
    data = quadrant_set(48, seed=1)
    monkeypatch.setattr(evaluation, "load_dataset", lambda name, split, root=None, shape=None: data)
    return data


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("eval")
    data = quadrant_set(48, seed=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluation, "load_dataset", lambda name, split, root=None, shape=None: data)
        results = evaluate(EvalConfig(model=str(trained_model_folder()), quick=True, limit=48,
                                      aware_limit=8, aware_attacks=QUICK_AWARE,
                                      out_dir=str(out), command="test"))
    return results, out


def test_quick_evaluation_writes_every_output(quick_results):
    pytest.importorskip("art")
    pytest.importorskip("matplotlib")
    results, out = quick_results
    for name in FILES:
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "results.json").read_text()) == results
    md = (out / "results.md").read_text()
    assert "## Oblivious attacks (crafted on the bare classifier), n = 48" in md
    assert "## Defense-aware attacks (crafted against adaptive), n = 8" in md
    assert "| PGD (L∞ 0.1, 10 steps) |" in md
    assert "| **worst case per image** over the 4 L∞ attacks above |" in md
    arrays = np.load(out / "per_image.npz")
    assert arrays["oblivious/pgd/correct/adaptive"].shape == (48,)
    assert arrays["oblivious/pgd/correct/adaptive"].mean() == pytest.approx(
        results["oblivious"]["pgd"]["accuracy"]["adaptive"], abs=1e-4)


def test_quick_tables_have_the_expected_shape(quick_results):
    pytest.importorskip("art")
    results, _ = quick_results
    obl, aware = results["oblivious"], results["defense_aware"]
    assert list(obl) == ["clean", "noise", *LIBRARY_ATTACKS, WORST_CASE]
    # evaluate's default: the strongest suite, and the attack on the detect-and-reject system
    assert DEFAULT_AWARE == ("aware-suite", "apgd-detector")
    assert list(aware) == ["clean", *QUICK_AWARE, WORST_CASE]
    assert obl[WORST_CASE]["over"] == ["fgsm", "rfgsm", "pgd", "autoattack"]
    for table, n in ((obl, 48), (aware, 8)):
        worst = table[WORST_CASE]
        for d in DEFENSES:  # the per-image worst case is at most every single attack
            assert worst["accuracy"][d] <= min(table[a]["accuracy"][d] for a in worst["over"])
            # ...with rejection too; and rejecting flagged inputs never lowers accuracy.
            assert worst["rejection"]["accuracy"][d] <= min(
                table[a]["rejection"]["accuracy"][d] for a in worst["over"])
            assert all(table[a]["rejection"]["accuracy"][d] >= table[a]["accuracy"][d]
                       for a in worst["over"])
        for name, row in table.items():
            if name == WORST_CASE:
                continue
            assert row["n"] == n
            assert list(row["accuracy"]) == list(DEFENSES)
            assert all(0.0 <= a <= 1.0 for a in row["accuracy"].values())
            if name == "clean":
                assert row["detection_auc"] is None and row["budget"] is None
                rejection = row["rejection"]  # the flag's false positives, and what is kept
                assert rejection["rejected"] == row["reconstruction_error"]["flagged"]
                assert rejection["accepted_n"] == round(n * (1 - rejection["rejected"]))
            else:
                assert 0.0 <= row["detection_auc"] <= 1.0
            if row["perturbation"] is not None:
                p = row["perturbation"]
                assert p["max"] <= p["eps"] * (1 + 1e-5)
    for name in (*LIBRARY_ATTACKS, *QUICK_AWARE):
        table = obl if name in obl else aware
        assert table[name]["budget"]["images"] == table[name]["n"]
    assert aware["pgd-eot"]["budget"]["per_image"]["purifier_backward"] == 3
    s = results["settings"]
    assert (s["n"], s["aware_n"], s["eps_linf"], s["eps_l2"], s["quick"]) == (48, 8, 0.1, 1.5,
                                                                             True)
    assert s["command"] == "test" and s["wall_seconds"] > 0


def test_undefended_accuracy_collapses_under_pgd_and_the_sweep_reuses_it(quick_results):
    pytest.importorskip("art")
    results, _ = quick_results
    obl, sweep = results["oblivious"], results["sweep"]
    assert obl["clean"]["accuracy"]["none"] >= 0.9
    assert obl["pgd"]["accuracy"]["none"] <= 0.1
    assert sweep["eps"] == [0.0, 0.05, 0.1, 0.2]
    i = sweep["eps"].index(0.1)
    for d in DEFENSES:
        assert len(sweep["accuracy"][d]) == 4
        assert sweep["accuracy"][d][0] == obl["clean"]["accuracy"][d]
        assert sweep["accuracy"][d][i] == obl["pgd"]["accuracy"][d]


def test_cli_evaluate_runs_and_reports(quadrant_data, tmp_path, capsys):
    pytest.importorskip("art")
    out = tmp_path / "ev"
    code = main(["evaluate", "--model", str(trained_model_folder()), "--quick", "--limit", "16",
                 "--attacks", "fgsm", "--aware-attacks", "bpda", "--aware-limit", "4",
                 "--defenses", "none,adaptive", "--sweep", "none", "--out", str(out)])
    assert code == 0
    assert "results.md" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert list(results["oblivious"]) == ["clean", "noise", "fgsm"]
    assert list(results["oblivious"]["fgsm"]["accuracy"]) == ["none", "adaptive"]
    assert results["sweep"]["eps"] == [0.0]


def test_cli_rejects_unknown_attacks_and_the_calib_split(quadrant_data, tmp_path, capsys):
    args = ["evaluate", "--model", str(trained_model_folder()), "--out", str(tmp_path)]
    assert main([*args, "--attacks", "bim"]) == 2
    assert "unknown attack or defense bim" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--split", "calib"])
    assert exit_.value.code == 2 and "invalid choice: 'calib'" in capsys.readouterr().err


def test_calibration_data_may_not_be_the_evaluation_data(monkeypatch, tmp_path):
    data = quadrant_set(8, seed=0)
    data.source = "quadrant blobs seed 0"  # what the fixture DAE was calibrated on
    monkeypatch.setattr(evaluation, "load_dataset", lambda name, split, root=None, shape=None: data)
    with pytest.raises(UserError, match="calibrated on"):
        evaluation.Evaluator(EvalConfig(model=str(trained_model_folder()), out_dir=str(tmp_path)))


def test_unknown_dataset_needs_explicit_eps(tmp_path):
    with pytest.raises(UserError, match="--eps"):
        EvalConfig(dataset="folder:/nowhere").resolved()


def test_roc_auc_matches_pairwise_counting():
    gen = torch.Generator().manual_seed(0)
    neg = torch.randint(0, 20, (57,), generator=gen).float()
    pos = torch.randint(5, 25, (43,), generator=gen).float()
    diff = pos[:, None] - neg[None, :]
    expected = ((diff > 0).double() + 0.5 * (diff == 0).double()).mean().item()
    assert roc_auc(neg, pos) == pytest.approx(expected)
    assert roc_auc(torch.zeros(3), torch.ones(2)) == 1.0
    assert roc_auc(torch.ones(3), torch.zeros(2)) == 0.0
    assert roc_auc(torch.ones(3), torch.ones(4)) == 0.5


def test_offset_splits_a_run_into_parts_with_the_same_per_image_results(quadrant_data,
                                                                         tmp_path):
    """Two runs over halves give each image what one run over the whole gives it: the
    attacks' random starts and the noise follow the batch's index in the split."""
    pytest.importorskip("art")
    common = dict(model=str(trained_model_folder()), quick=True, attacks=("pgd",),
                  aware_attacks=("bpda",), defenses=("none", "adaptive"), sweep=(),
                  batch_size=4, aware_batch_size=4, command="test")
    whole = tmp_path / "whole"
    evaluate(EvalConfig(limit=8, aware_limit=8, out_dir=str(whole), **common))
    part = tmp_path / "part"
    results = evaluate(EvalConfig(limit=4, offset=4, aware_limit=4, out_dir=str(part),
                                  **common))
    assert results["settings"]["data"].endswith("[4:8]")
    a, b = np.load(whole / "per_image.npz"), np.load(part / "per_image.npz")
    keys = [k for k in b.files if "/error" in k or "/correct/" in k]
    assert any(k.startswith("defense_aware/") for k in keys)
    for k in keys:
        np.testing.assert_allclose(b[k], a[k][4:], rtol=1e-5, atol=1e-6, err_msg=k)
    with pytest.raises(UserError, match="--offset must be a non-negative multiple"):
        EvalConfig(offset=3, batch_size=4, **{k: v for k, v in common.items()
                                               if k not in ("batch_size",)})


def test_defenses_score_on_the_chosen_backend_and_attacks_craft_on_the_reference(
        quadrant_data, tmp_path):
    """Every defense is a Purifier with --backend; the attacks' target keeps the reference
    (the only differentiable path); what scores is recorded resolved (auto -> compiled)."""
    ev = evaluation.Evaluator(EvalConfig(model=str(trained_model_folder()), backend="auto",
                                         out_dir=str(tmp_path)))
    assert {d: p and p.backend for d, p in ev.defenses.items()} == {
        "none": None, **{d: "auto" for d in DEFENSES[1:]}}
    assert ev.target.backend == "reference"
    expected = ev.defenses["adaptive"].backend_report()["backend"]
    assert ev.defense_backend == expected
