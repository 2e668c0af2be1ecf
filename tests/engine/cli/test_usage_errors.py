"""`purify` usage errors answer before torch loads, as one line and exit status 2; --threads."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from apudae_engine.cli import main

# Runs the CLI in a fresh interpreter and reports whether torch was imported: usage errors
# must not wait for it (it takes seconds to load on a cold start).
_PROBE = ("import sys; from apudae_engine.cli import main\n"
          "rc = main(sys.argv[1:])\n"
          "print('torch' in sys.modules)\n"
          "sys.exit(rc)\n")


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize(("args", "message"), [
    (["--input", "{tmp}/missing"], "error: input folder {tmp}/missing does not exist"),
    (["--input", "{tmp}/file.png"], "error: input {tmp}/file.png is not a folder"),
    (["--input", "{tmp}", "--batch", "0"], "error: --batch must be at least 1, got 0"),
    (["--input", "{tmp}", "--workers", "0"], "error: --workers must be at least 1, got 0"),
    (["--input", "{tmp}", "--threads", "0"], "error: --threads must be at least 1, got 0"),
    (["--input", "{tmp}", "--preview", "-1"], "error: --preview must be at least 0, got -1"),
])
def test_purify_usage_errors_are_one_line_exit_2_without_torch(tmp_path, args, message):
    (tmp_path / "file.png").write_bytes(b"")
    res = _run("purify", *(a.format(tmp=tmp_path) for a in args))
    assert res.returncode == 2, res.stderr
    assert res.stderr == message.format(tmp=tmp_path) + "\n"
    assert res.stdout == "False\n"  # answered before torch was imported


def test_purify_threads_sets_torch_threads(image_folder, tiny_model, tmp_path):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main(["purify", "--input", str(image_folder), "--output", str(tmp_path / "o"),
                     "--model", str(tiny_model), "--classifier", "none", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert len(list((tmp_path / "o").rglob("*.png"))) == 10
