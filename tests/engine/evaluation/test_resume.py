"""`evaluate` keeps each batch in OUT/parts: an interrupted run resumes, several workers share
one run, and the tables built from parts equal those of one uninterrupted run."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import threading
import time

import numpy as np
import pytest
import torch
from robust_task import quadrant_set, trained_model_folder

import apudae_engine.evaluation.run as evaluation
from apudae_engine.core.errors import UserError
from apudae_engine.evaluation import parts
from apudae_engine.evaluation.config import EvalConfig
from apudae_engine.evaluation.parts import PartStore
from apudae_engine.evaluation.run import Evaluator, evaluate

# 12 images in batches of 4: three oblivious batches, two defense-aware, three of the sweep.
# FGSM and BPDA draw no global random numbers, so two threads give what one run gives.
COMMON = dict(quick=True, limit=12, batch_size=4, attacks=("fgsm",), aware_attacks=("bpda",),
              aware_limit=8, aware_batch_size=4, defenses=("none", "adaptive"), command="test")
PARTS = 3 + 2 + 3


def _config(out, **kw) -> EvalConfig:
    return EvalConfig(model=str(trained_model_folder()), out_dir=str(out),
                      **{**COMMON, "sweep": (0.05,), **kw})


def _tables(results: dict) -> dict:
    """The result tables without timings (which differ between any two runs)."""
    def strip(v):
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items()
                    if k not in ("attack_seconds", "attack_cpu_seconds", "defense_seconds")}
        return v
    return strip({k: v for k, v in results.items() if k != "settings"})


def _names(out) -> list[str]:
    return sorted(p.name for p in (out / "parts").glob("*.npz"))


@pytest.fixture(autouse=True)
def quadrant_data(monkeypatch):
    torch.set_num_threads(1)
    data = quadrant_set(12, seed=1)
    monkeypatch.setattr(evaluation, "load_dataset", lambda name, split, root=None, shape=None: data)
    monkeypatch.setattr(parts, "POLL_SECONDS", 0.1)
    return data


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """One uninterrupted run: its results and output folder."""
    pytest.importorskip("art")
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("whole")
    data = quadrant_set(12, seed=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluation, "load_dataset", lambda name, split, root=None, shape=None: data)
        return evaluate(_config(out)), out


def test_an_uninterrupted_run_keeps_every_batch_and_records_its_parts(whole):
    results, out = whole
    assert len(_names(out)) == PARTS
    assert "oblivious-b000000.npz" in _names(out) and "sweep-b000002.npz" in _names(out)
    identity = json.loads((out / "parts" / "identity.json").read_text())
    assert identity["identity"]["eps_linf"] == 0.1 and len(identity["fingerprint"]) == 64
    assert not list((out / "parts").glob("*.claim"))
    p = results["settings"]["parts"]
    assert (p["used"], p["computed_by_this_process"]) == (PARTS, PARTS)
    assert p["workers"] == [{"host": socket.gethostname(), "pid": os.getpid()}]
    assert p["attack_seconds"] > 0 and p["attack_cpu_seconds"] > 0
    arrays = np.load(out / "per_image.npz")
    draws = arrays["defense_aware/bpda/draws"]
    assert draws.shape == (8,) and draws.max() <= 4
    assert results["defense_aware"]["bpda"]["draws"]["mean"] == pytest.approx(
        draws.mean() / 4, abs=1e-4)


def test_an_interrupted_run_resumes_where_it_stopped(whole, tmp_path, monkeypatch, caplog):
    """Killed after its second batch, the rerun computes only the rest and gives the tables
    of the uninterrupted run."""
    out = tmp_path / "run"
    write, written = PartStore.write, []

    def write_then_die(self, name, meta, arrays):
        write(self, name, meta, arrays)
        written.append(name)
        if len(written) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(PartStore, "write", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        evaluate(_config(out))
    assert _names(out) == ["oblivious-b000000.npz", "oblivious-b000001.npz"]
    assert not list((out / "parts").glob("*.claim")), "an interrupted run leaves no claim"
    assert not (out / "results.json").exists()
    monkeypatch.setattr(PartStore, "write", write)
    with caplog.at_level(logging.INFO, logger="apudae_engine.evaluation.run"):
        results = evaluate(_config(out))
    assert "oblivious: resuming: 2 of 3 batches already done" in caplog.text
    assert results["settings"]["parts"]["computed_by_this_process"] == PARTS - 2
    assert _tables(results) == _tables(whole[0])
    assert json.loads((out / "results.json").read_text()) == results
    a, b = np.load(whole[1] / "per_image.npz"), np.load(out / "per_image.npz")
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_a_run_with_other_settings_refuses_the_folder(whole, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(whole[1], out)
    with pytest.raises(UserError, match=r"parts holds batches of another run: eps_linf is 0\.1 "
                                        r"there and 0\.2 here; .*--fresh"):
        Evaluator(_config(out, eps=0.2)).open_parts()
    with pytest.raises(UserError, match="attacks is"):
        Evaluator(_config(out, attacks=("pgd",))).open_parts()
    # Image ranges are not part of the identity: a shorter run reuses the parts it covers.
    results = evaluate(_config(out, limit=8, aware_limit=4))
    assert results["settings"]["parts"]["computed_by_this_process"] == 0
    # --fresh discards the parts of the other run.
    Evaluator(_config(out, eps=0.2)).open_parts(fresh=True)
    assert _names(out) == []
    assert json.loads((out / "parts" / "identity.json").read_text())["identity"]["eps_linf"] == 0.2


def test_a_damaged_part_is_computed_again_with_a_warning(whole, tmp_path, caplog):
    out = tmp_path / "copy"
    shutil.copytree(whole[1], out)
    damaged = out / "parts" / "defense_aware-b000001.npz"
    damaged.write_bytes(damaged.read_bytes()[:200])
    with caplog.at_level(logging.INFO):
        results = evaluate(_config(out))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(damaged) in warnings[0]
    assert results["settings"]["parts"]["computed_by_this_process"] == 1
    assert _tables(results) == _tables(whole[0])


def test_two_workers_share_the_batches_and_give_one_runs_tables(tmp_path, monkeypatch):
    """Two workers on one folder at once: each batch computed once, the tables of one run.
    (Threads of one process; their claims differ by token as two processes' differ by pid.)"""
    pytest.importorskip("art")
    kw = dict(sweep=(), limit=12, aware_limit=8)
    single = evaluate(_config(tmp_path / "single", **kw))
    out, computed, barrier, started = tmp_path / "shared", [], threading.Barrier(2), set()
    score, compute = Evaluator._score_batch, Evaluator.compute

    def counted(self, t, g, start, stop, heartbeat=None):
        computed.append((t.key, g, threading.get_ident()))
        return score(self, t, g, start, stop, heartbeat)

    def together(self, *args, **kwargs):
        if threading.get_ident() not in started:  # both loaded before either takes a batch
            started.add(threading.get_ident())
            barrier.wait(timeout=60)
        return compute(self, *args, **kwargs)

    monkeypatch.setattr(Evaluator, "_score_batch", counted)
    monkeypatch.setattr(Evaluator, "compute", together)
    returned, errors = [], []

    def worker():
        try:
            returned.append(evaluate(_config(out, **kw)))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    batches = [(k, g) for k, g, _ in computed]
    assert sorted(batches) == sorted(set(batches)), "a batch was computed twice"
    assert len(batches) == 3 + 2
    assert len({ident for _, _, ident in computed}) == 2, "one worker did everything"
    results = [r for r in returned if r is not None]
    assert results, "no worker wrote the report"
    assert _tables(json.loads((out / "results.json").read_text())) == _tables(single)
    assert len(results[0]["settings"]["parts"]["workers"]) == 1  # one pid, two tokens
    assert not list((out / "parts").glob("*.claim"))


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _claim(out, name, **holder) -> None:
    (out / "parts").mkdir(parents=True, exist_ok=True)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "token": "other",
              "started": time.time(), **holder}
    (out / "parts" / f"{name}.claim").write_text(json.dumps(record))


def test_a_live_claim_is_left_to_its_worker_and_a_dead_one_taken_over(tmp_path, caplog):
    pytest.importorskip("art")
    kw = dict(limit=8, aware_attacks=(), sweep=())
    out = tmp_path / "run"
    # A live worker (this process, another token) holds batch 1: without waiting, this worker
    # computes batch 0 and leaves batch 1 and the report to it.
    _claim(out, "oblivious-b000001")
    with caplog.at_level(logging.INFO):
        assert evaluate(_config(out, **kw), wait=False) is None
    assert _names(out) == ["oblivious-b000000.npz"]
    assert "1 batches are being computed by other workers (pid" in caplog.text
    assert not (out / "results.json").exists()
    # That worker died: its claim is stale and taken over.
    _claim(out, "oblivious-b000001", pid=_dead_pid())
    caplog.clear()
    with caplog.at_level(logging.INFO):
        results = evaluate(_config(out, **kw), wait=False)
    assert "took over" in caplog.text and "oblivious-b000001.claim" in caplog.text
    assert results["settings"]["parts"]["computed_by_this_process"] == 1
    assert results["oblivious"]["clean"]["n"] == 8
    assert not list((out / "parts").glob("*.claim"))


def test_claims_from_other_hosts_go_stale_by_age(tmp_path):
    store = PartStore(tmp_path / "parts", {"eps": 0.1})
    _claim(tmp_path, "a", host="elsewhere", pid=1)
    assert not store.claim("a")  # fresh: another machine is working on it
    old = time.time() - parts.STALE_SECONDS - 60
    os.utime(tmp_path / "parts" / "a.claim", (old, old))
    assert store.claim("a")
    assert json.loads((tmp_path / "parts" / "a.claim").read_text())["token"] == store.token
    store.release("a")
    assert not (tmp_path / "parts" / "a.claim").exists()


def test_cli_resumes_refuses_other_settings_and_starts_fresh(tmp_path, capsys, caplog):
    pytest.importorskip("art")
    from apudae_engine.cli import main

    out = tmp_path / "ev"
    args = ["evaluate", "--model", str(trained_model_folder()), "--quick", "--limit", "8",
            "--batch", "4", "--attacks", "fgsm", "--aware-attacks", "none", "--sweep", "none",
            "--defenses", "none,adaptive", "--threads", "1", "--out", str(out)]
    assert main(args) == 0
    first = json.loads((out / "results.json").read_text())
    with caplog.at_level(logging.INFO):
        assert main(args) == 0
    assert "oblivious: resuming: 2 of 2 batches already done" in caplog.text
    again = json.loads((out / "results.json").read_text())
    assert again["settings"]["parts"]["computed_by_this_process"] == 0
    report = (out / "results.md").read_text()  # a run that only assembled says so
    assert "Report assembled from the workers' parts in" in report and "Wall time" not in report
    assert _tables(again) == _tables(first)
    capsys.readouterr()
    assert main([*args, "--eps", "0.2"]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'parts'} holds batches of another run: eps_linf is 0.1 there" in err
    assert main([*args, "--eps", "0.2", "--fresh"]) == 0
    assert json.loads((out / "results.json").read_text())["settings"]["eps_linf"] == 0.2
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    assert "rerun the same command to resume" in " ".join(capsys.readouterr().out.split())

