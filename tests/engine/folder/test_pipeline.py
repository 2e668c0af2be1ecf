"""`purify` on folders: outputs, manifest, bad input, resume after a kill, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from synthetic import make_digits

from apudae_engine.backends.purifier import Purifier
from apudae_engine.cli import main
from apudae_engine.folder.local import FolderJob, path_identity, purify_folder
from apudae_engine.method.config import PurifyConfig

SEED0 = PurifyConfig(seed=0)


def run_cli(*args: str) -> int:
    return main(["purify", *args])


def read_manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))
            if p.name != "preview.png"}


def test_purify_writes_pngs_manifest_summary_and_preview(tiny_model, image_folder, tmp_path):
    out = tmp_path / "out"
    code = run_cli("--input", str(image_folder), "--output", str(out), "--model", str(tiny_model),
                   "--batch", "4", "--preview", "3")
    assert code == 0
    pngs = sorted(p.relative_to(out) for p in out.rglob("*.png") if p.name != "preview.png")
    assert [str(p) for p in pngs] == [f"a/img{i}.png" for i in range(5)] + \
        [f"b/img{i}.png" for i in range(5, 10)]
    with Image.open(out / "a/img0.png") as im:
        assert im.mode == "L" and im.size == (28, 28)
    recs = read_manifest(out)
    assert [r["path"] for r in recs] == sorted(r["path"] for r in recs)
    assert all(r["status"] == "ok" for r in recs) and len(recs) == 10
    for r in recs:
        assert {"r_before", "r_after", "flagged", "active_steps", "label_before",
                "label_after"} <= set(r)
        assert r["steps"] == 13
    # The PNGs are the reference purifier's output, its noise keyed by the relative path and
    # the run's secret seed, which run.json records.
    run = json.loads((out / "run.json").read_text())
    assert isinstance(run["config"]["seed"], int) and run["ran"]["seed"] == "secret"
    purifier = Purifier.from_pretrained(tiny_model, PurifyConfig(seed=run["config"]["seed"]))
    x = torch.stack([torch.from_numpy(np.array(Image.open(image_folder / r["path"])))[None]
                     for r in recs]).float() / 255
    ids = torch.tensor([path_identity(r["path"]) for r in recs])
    ref = purifier.purify(x, ids)
    got = np.stack([np.asarray(Image.open(out / r["output"]), np.int16) for r in recs])
    assert np.abs(got - np.rint(ref.images[:, 0].numpy() * 255)).max() <= 1
    assert not np.array_equal(got, np.rint(x[:, 0].numpy() * 255))
    assert [r["r_before"] for r in recs] == pytest.approx(ref.error_before.tolist(), abs=1e-5)
    assert [r["active_steps"] for r in recs] == ref.active_steps.tolist()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] == 10 and summary["failed"] == 0
    with Image.open(out / "preview.png") as im:
        assert im.size[0] > im.size[1] / 3  # three columns
        assert im.size[1] >= 3 * 28


def test_bad_inputs_are_recorded_and_do_not_stop_the_run(tiny_model, image_folder, tmp_path):
    (image_folder / "empty.png").write_bytes(b"")
    (image_folder / "text.jpg").write_bytes(b"this is not a jpeg")
    good = (image_folder / "a" / "img0.png").read_bytes()
    (image_folder / "truncated.png").write_bytes(good[: len(good) // 2])
    Image.new("RGBA", (30, 30), (255, 0, 0, 128)).save(image_folder / "rgba.png")
    Image.new("CMYK", (20, 20), (0, 255, 0, 0)).save(image_folder / "cmyk.jpg")
    Image.new("P", (28, 28), 3).save(image_folder / "palette.bmp")
    Image.fromarray(np.full((28, 28), 40000, np.uint16)).save(image_folder / "deep.tif")
    out = tmp_path / "out"
    code = run_cli("--input", str(image_folder), "--output", str(out), "--model", str(tiny_model),
                   "--batch", "3")
    assert code == 1  # something failed
    recs = {r["path"]: r for r in read_manifest(out)}
    assert recs["empty.png"]["status"] == "error" and "empty file" in recs["empty.png"]["error"]
    assert "not a recognised image" in recs["text.jpg"]["error"]
    assert "truncated" in recs["truncated.png"]["error"]
    for name in ("rgba.png", "cmyk.jpg", "palette.bmp", "deep.tif"):
        assert recs[name]["status"] == "ok", recs[name]
    assert (out / "cmyk.png").is_file() and (out / "deep.png").is_file()
    assert sum(r["status"] == "ok" for r in recs.values()) == 14


def test_decompression_bomb_is_refused(tiny_model, image_folder, tmp_path):
    Image.new("L", (400, 400)).save(image_folder / "big.png")
    out = tmp_path / "out"
    assert run_cli("--input", str(image_folder), "--output", str(out), "--model", str(tiny_model),
                   "--max-pixels", "10000") == 1
    recs = {r["path"]: r for r in read_manifest(out)}
    assert "decompression bomb" in recs["big.png"]["error"]


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("empty", "no images"),
    ("inside", "inside the input folder"),
])
def test_folder_errors(tiny_model, tmp_path, image_folder, capsys, case, message):
    inp = {"missing": tmp_path / "nope", "empty": tmp_path / "emptydir",
           "inside": image_folder}[case]
    if case == "empty":
        inp.mkdir()
    out = image_folder / "out" if case == "inside" else tmp_path / "o"
    assert run_cli("--input", str(inp), "--output", str(out), "--model", str(tiny_model)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_existing_output_needs_overwrite(tiny_model, image_folder, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("precious")
    assert run_cli("--input", str(image_folder), "--output", str(out), "--model",
                   str(tiny_model)) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert run_cli("--input", str(image_folder), "--output", str(out), "--model",
                   str(tiny_model)) == 2
    # A run with other settings is also refused until --overwrite.
    out2 = tmp_path / "out2"
    assert run_cli("--input", str(image_folder), "--output", str(out2), "--model",
                   str(tiny_model), "--seed", "1") == 0
    assert run_cli("--input", str(image_folder), "--output", str(out2), "--model",
                   str(tiny_model), "--seed", "2") == 2
    assert run_cli("--input", str(image_folder), "--output", str(out2), "--model",
                   str(tiny_model), "--seed", "2", "--overwrite") == 0


def test_rerun_resumes_and_matches_uninterrupted_run(tiny_model, image_folder, tmp_path):
    full = tmp_path / "full"
    assert purify_folder(FolderJob(image_folder, full, batch_size=4, model=tiny_model,
                                   config=SEED0)).ok == 10
    # Simulate a kill after the first batch: drop later records and outputs.
    part = tmp_path / "part"
    purify_folder(FolderJob(image_folder, part, batch_size=4, model=tiny_model, config=SEED0))
    recs = (part / "manifest.jsonl").read_text().splitlines()
    (part / "manifest.jsonl").write_text("\n".join(recs[:4]) + "\n" + recs[4][:10])  # torn line
    for r in recs[4:]:
        (part / json.loads(r)["output"]).unlink()
    stale = part / "b" / ".img9.png.part4242"  # a kill in the middle of a write
    stale.write_bytes(b"half a png")
    # No seed given: the rerun resumes with the one run.json recorded.
    s = purify_folder(FolderJob(image_folder, part, batch_size=3, model=tiny_model))
    assert s.resumed == 4 and s.ok == 10
    assert not stale.exists()
    assert tree_bytes(part) == tree_bytes(full)
    assert (part / "manifest.jsonl").read_text() == (full / "manifest.jsonl").read_text()


def test_batch_size_does_not_change_outputs(tiny_model, image_folder, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    purify_folder(FolderJob(image_folder, a, batch_size=10, model=tiny_model, config=SEED0))
    purify_folder(FolderJob(image_folder, b, batch_size=1, model=tiny_model, config=SEED0))
    ta, tb = tree_bytes(a), tree_bytes(b)
    assert ta.keys() == tb.keys()
    for k in ta:  # 8-bit outputs: batched convolutions may move a value across a rounding edge
        x = np.asarray(Image.open(a / k), np.int16)
        y = np.asarray(Image.open(b / k), np.int16)
        assert np.abs(x - y).max() <= 1


def test_kill_and_resume_subprocess(tiny_model, tmp_path):
    inp = tmp_path / "many"
    inp.mkdir()
    for i, arr in enumerate(make_digits(60, seed=5)):
        Image.fromarray(arr, "L").save(inp / f"{i:03d}.png")
    cmd = [sys.executable, "-m", "apudae_engine.cli", "purify", "--input", str(inp),
           "--model", str(tiny_model), "--batch", "4", "--classifier", "none", "--seed", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "APUDAE_PROGRESS": "0"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "--output", str(killed)], env=env,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        m = killed / "manifest.jsonl"
        if m.exists() and len(m.read_text().splitlines()) >= 8:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    done_before = len((killed / "manifest.jsonl").read_text().splitlines())
    assert done_before < 60, "run finished before it could be killed; test is not testing resume"
    assert subprocess.run([*cmd, "--output", str(killed)], env=env,
                          stderr=subprocess.DEVNULL).returncode == 0
    clean = tmp_path / "clean"
    assert subprocess.run([*cmd, "--output", str(clean)], env=env,
                          stderr=subprocess.DEVNULL).returncode == 0
    assert tree_bytes(killed) == tree_bytes(clean)
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["resumed"] >= 8 and summary["ok"] == 60
    assert not list(killed.rglob(".*part*"))  # no temporary files left behind


def test_auto_runs_the_reference_on_small_jobs(tiny_model, image_folder, tmp_path, caplog,
                                               monkeypatch):
    import apudae_engine.folder.run as pipeline

    made = []
    real = pipeline.Purifier.from_pretrained
    monkeypatch.setattr(pipeline.Purifier, "from_pretrained", lambda *a, **k: (
        made.append(k["backend"]), real(*a, **k))[1])
    with caplog.at_level("INFO"):
        purify_folder(FolderJob(image_folder, tmp_path / "a", model=tiny_model, device="cpu",
                                backend="auto"))
    assert made == ["reference"] and "too few to repay compiling" in caplog.text
    import apudae_engine.backends.selection as selection

    monkeypatch.setattr(selection, "AUTO_MIN_IMAGES", 1)
    purify_folder(FolderJob(image_folder, tmp_path / "b", model=tiny_model, device="cpu",
                            backend="auto", precision="fp32"))
    assert made[1] == "auto"


def test_progress_lines_count_what_is_committed(tiny_model, image_folder, tmp_path, caplog,
                                                monkeypatch):
    """In a log (no terminal), one line per batch; its counters match the count it shows."""
    monkeypatch.delenv("APUDAE_PROGRESS", raising=False)
    with caplog.at_level("INFO", logger="apudae_engine.progress"):
        purify_folder(FolderJob(image_folder, tmp_path / "o", batch_size=4, model=tiny_model,
                                config=SEED0))
    lines = [r.getMessage() for r in caplog.records if r.name == "apudae_engine.progress"]
    assert [line.split(",")[0] for line in lines] == [
        "purify: 4/10 (40 %)", "purify: 8/10 (80 %)", "purify: 10/10 (100 %)"]
    for line, done in zip(lines, (4, 8, 10)):
        assert f"ok {done}, failed 0, flagged " in line and line.count("/s") == 1
