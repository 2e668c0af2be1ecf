"""`bench` without --out writes its record to a per-user folder, never the current directory."""

from __future__ import annotations

import json

import pytest

from apudae_engine.cli import main


@pytest.mark.slow
def test_bench_writes_to_the_per_user_results_folder(tmp_path, monkeypatch, capsys):
    work, data = tmp_path / "work", tmp_path / "data"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("XDG_DATA_HOME", str(data))
    assert main(["bench", "--cases", "fmnist", "--batch", "1", "--backends", "reference",
                 "--repeats", "1", "--steps", "1", "--device", "cpu"]) == 0
    assert list(work.iterdir()) == []
    [record] = (data / "apudae-engine" / "bench").glob("purify_*_cpu.json")
    assert f"wrote {record}" in capsys.readouterr().out
    assert json.loads(record.read_text())["results"][0]["backend"] == "reference"
