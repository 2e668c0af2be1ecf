"""The compile check: every Triton kernel the engine launches compiles to cubin without a GPU."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from apudae_kernels.compile_check import KERNELS

ROOT = Path(__file__).resolve().parents[2]


def _no_ptxas() -> str | None:
    """Why ptxas cannot run here, or None when it can."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        get_ptxas(90)
    except (ImportError, RuntimeError) as exc:
        return f"no ptxas for sm_90 ({exc}); triton's CUDA backend ships it"
    return None


def test_the_list_is_what_the_engine_launches() -> None:
    """Every apudae_kernels module whose *_triton launcher engine/ imports is compiled."""
    launched = {
        node.module
        for path in (ROOT / "engine").rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom)
        and (node.module or "").startswith("apudae_kernels.")
        and any(a.name.endswith("_triton") for a in node.names)
    }
    assert launched, "no Triton launcher imported in engine/: has the backend moved?"
    assert launched == set(KERNELS.values())


def test_every_launched_kernel_compiles_for_one_target(tmp_path: Path) -> None:
    reason = _no_ptxas()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "report.json"
    # A fresh process: this one runs triton under TRITON_INTERPRET (tests/conftest.py).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "apudae_kernels.compile_check", "--targets", "sm_90", "--quick",
         "--jobs", "1", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["gpu_present"] in (True, False) and report["ptxas"]["sm_90"]
    assert {row["kernel"] for row in report["rows"]} == set(KERNELS)
    compiled = [c for row in report["rows"] for c in row["compiled"]]
    assert compiled and all(not c["error"] for c in compiled)
    assert all(c["registers"] > 0 and c["arch"].startswith("sm_90") for c in compiled)
    assert "adaptive_update" in proc.stdout and "ok" in proc.stdout


def test_an_older_triton_is_refused_with_the_version_it_needs(monkeypatch, capsys) -> None:
    """The check reproduces triton's launch binding through ``triton.knobs`` (3.4+): an older
    triton gets one error naming the installed version and the floor, not a stack trace."""
    triton = pytest.importorskip("triton")
    from apudae_kernels import compile_check

    monkeypatch.setattr(triton, "__version__", "3.2.0")
    if "TRITON_INTERPRET" in os.environ:  # main() drops it; monkeypatch puts it back after
        monkeypatch.setenv("TRITON_INTERPRET", os.environ["TRITON_INTERPRET"])
    assert compile_check.main(["--targets", "sm_90", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "needs triton >= 3.4" in err and "triton 3.2.0" in err
