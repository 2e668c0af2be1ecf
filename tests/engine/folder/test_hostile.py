"""Nothing lost, nothing silently wrong: hostile inputs and outputs (issue 12) for `purify`.

Each test names the item of the issue it covers; each was seen failing without its fix.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apudae_engine.cli import main
from apudae_engine.folder import contract, guard
from apudae_engine.folder.local import FolderJob, purify_folder
from apudae_engine.method.config import PurifyConfig


def run_cli(*args: str) -> int:
    return main(["purify", "--classifier", "none", *args])


def read_manifest(out: Path) -> dict[str, dict]:
    return {r["path"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text()
                                       .splitlines())}


def outputs(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.rglob("*.png") if p.name != "preview.png"}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


# -- 1. two inputs, one output --------------------------------------------------------------------


def test_inputs_that_would_share_an_output_get_their_own(tiny_model, image_folder, tmp_path):
    img = Image.open(image_folder / "a" / "img0.png")
    for name in ("x.png", "x.jpg", "CASE.PNG", "CASE.png", "preview.png"):
        img.save(image_folder / name, format="PNG" if "png" in name.lower() else "JPEG")
    out = tmp_path / "out"
    assert run_cli("--input", str(image_folder), "--output", str(out), "--model",
                   str(tiny_model), "--preview", "2") == 0
    recs = read_manifest(out)
    assert len(recs) == 15 and all(r["status"] == "ok" for r in recs.values())
    names = [r["output"] for r in recs.values()]
    assert len({n.casefold() for n in names}) == 15  # unique, even on a case-blind disk
    assert recs["x.png"]["output"] == "x.png.png" and recs["x.jpg"]["output"] == "x.jpg.png"
    assert recs["CASE.PNG"]["output"].startswith("CASE.PNG.")
    assert recs["preview.png"]["output"] == "preview.png.png"  # the grid keeps its name
    assert recs["a/img0.png"]["output"] == "a/img0.png"  # no clash: the usual name
    assert outputs(out) == set(names)


def test_output_names_rule():
    names = contract.output_names(["a.jpg", "b.png", "b.jpg", "C.png", "c.PNG", "d/e.tif"])
    assert names["a.jpg"] == "a.png" and names["d/e.tif"] == "d/e.png"
    assert names["b.png"] == "b.png.png" and names["b.jpg"] == "b.jpg.png"
    assert names["C.png"] != names["c.PNG"] and \
        names["C.png"].casefold() != names["c.PNG"].casefold()


# -- 2. the input folder and its files are part of the run -----------------------------------------


def test_another_input_folder_is_not_a_resume(tiny_model, image_folder, tmp_path, capsys):
    import shutil

    other = shutil.copytree(image_folder, tmp_path / "other")  # same names, sizes and mtimes
    out = tmp_path / "out"
    args = ["--output", str(out), "--model", str(tiny_model)]
    assert run_cli("--input", str(image_folder), *args) == 0
    capsys.readouterr()
    assert run_cli("--input", str(other), *args) == 2
    assert "--overwrite" in one_line_error(capsys)
    assert run_cli("--input", str(other), *args, "--overwrite") == 0
    assert json.loads((out / "summary.json").read_text())["resumed"] == 0


def test_a_changed_input_is_refused_then_redone_with_overwrite(tiny_model, image_folder, tmp_path,
                                                               capsys):
    out = tmp_path / "out"
    args = ["--input", str(image_folder), "--output", str(out), "--model", str(tiny_model)]
    assert run_cli(*args) == 0
    recs = read_manifest(out)
    assert recs["a/img1.png"]["source"]["size"] == (image_folder / "a/img1.png").stat().st_size
    Image.fromarray(np.full((28, 28), 200, np.uint8)).save(image_folder / "a" / "img1.png")
    capsys.readouterr()
    assert run_cli(*args) == 2
    assert "'a/img1.png'" in one_line_error(capsys)
    assert run_cli(*args, "--overwrite") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed"] == 9 and summary["ok"] == 10  # only the changed file is redone
    assert read_manifest(out)["a/img1.png"]["r_before"] != recs["a/img1.png"]["r_before"]


def test_an_input_replaced_by_a_broken_file_loses_its_old_output(tiny_model, image_folder,
                                                                   tmp_path):
    """--overwrite redoes a changed input; when it now fails, the purified file of the
    earlier run must go, or the folder would hold an output its manifest calls an error."""
    out = tmp_path / "out"
    args = ["--input", str(image_folder), "--output", str(out), "--model", str(tiny_model)]
    assert run_cli(*args) == 0
    old = out / read_manifest(out)["a/img1.png"]["output"]
    assert old.is_file()
    (image_folder / "a" / "img1.png").write_bytes(b"not a png any more")
    assert run_cli(*args, "--overwrite") == 1  # one image failed
    rec = read_manifest(out)["a/img1.png"]
    assert rec["status"] == "error" and rec["error"]
    assert not old.exists()
    assert sum(r["status"] == "ok" for r in read_manifest(out).values()) == 9


# -- 3. names that are not UTF-8 ------------------------------------------------------------------


@pytest.mark.skipif(os.uname().sysname == "Darwin", reason="macOS stores names as UTF-8 only")
def test_a_name_that_is_not_utf8_is_purified_and_resumed(tiny_model, image_folder, tmp_path):
    raw = os.path.join(os.fsencode(image_folder), b"caf\xff.png")
    with open(raw, "wb") as f:
        f.write((image_folder / "a" / "img0.png").read_bytes())
    out = tmp_path / "out"
    args = ["--input", str(image_folder), "--output", str(out), "--model", str(tiny_model),
            "--preview", "11"]  # the preview names it too
    assert run_cli(*args) == 0
    recs = read_manifest(out)
    name = os.fsdecode(b"caf\xff.png")
    assert recs[name]["status"] == "ok"
    assert os.path.exists(os.path.join(os.fsencode(out), b"caf\xff.png"))
    assert run_cli(*args) == 0
    assert json.loads((out / "summary.json").read_text())["resumed"] == 11


# -- 4. NaN never becomes a black image or an "ok" record ------------------------------------------


def test_a_result_holding_nan_gets_an_error_record(tiny_model, image_folder, tmp_path,
                                                   poison_result):
    poison_result(0, float("nan"))  # the first image of each batch
    out = tmp_path / "out"
    s = purify_folder(FolderJob(image_folder, out, batch_size=5, model=tiny_model,
                                classifier="none"))
    recs = read_manifest(out)
    bad = [p for p, r in recs.items() if r["status"] == "error"]
    assert bad == ["a/img0.png", "b/img5.png"] and s.failed == 2 and s.ok == 8
    assert all("NaN" in recs[p]["error"] for p in bad)
    assert not (out / "a/img0.png").exists() and not (out / "b/img5.png").exists()


def test_nan_calibration_is_refused_at_load_time(tiny_model, image_folder, tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    for f in ("dae.json", "dae.safetensors"):
        (model / f).write_bytes((tiny_model / f).read_bytes())
    doc = json.loads((model / "dae.json").read_text())
    doc["calibration"]["mu"] = float("nan")
    (model / "dae.json").write_text(json.dumps(doc))
    assert run_cli("--input", str(image_folder), "--output", str(tmp_path / "o"), "--model",
                   str(model)) == 2
    assert "calibration.mu" in one_line_error(capsys)
    assert not (tmp_path / "o").exists()


# -- 5. output problems: one line, and a full disk stops cleanly ----------------------------------


def test_output_that_is_a_file_or_under_a_file(tiny_model, image_folder, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out in (afile, afile / "sub"):
        assert run_cli("--input", str(image_folder), "--output", str(out), "--model",
                       str(tiny_model)) == 2
        line = one_line_error(capsys)
        assert str(afile) in line and "is a file" in line


@pytest.mark.parametrize("code, reason", [(errno.EROFS, "read-only"),
                                          (errno.EACCES, "permission denied")])
def test_unwritable_output_folder(tiny_model, image_folder, tmp_path, capsys, monkeypatch, code,
                                  reason):
    def refuse(path, data):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(contract, "write_atomic", refuse)
    out = tmp_path / "out"
    assert run_cli("--input", str(image_folder), "--output", str(out), "--model",
                   str(tiny_model)) == 2
    line = one_line_error(capsys)
    assert str(out) in line and reason in line


@pytest.mark.parametrize("code, reason", [(errno.ENOSPC, "disk is full"),
                                          (errno.EFBIG, "file size limit")])
def test_a_full_disk_stops_cleanly_and_a_rerun_resumes(tiny_model, image_folder, tmp_path, capsys,
                                                       monkeypatch, code, reason):
    import apudae_engine.folder.local as local

    real, calls = local.write_atomic, []

    def fill_up(path, data):
        calls.append(path)
        if len(calls) > 6:  # the first batch of 4 and half the second fit
            raise OSError(code, os.strerror(code))
        real(path, data)

    monkeypatch.setattr(local, "write_atomic", fill_up)
    out = tmp_path / "out"
    args = ["--input", str(image_folder), "--output", str(out), "--model", str(tiny_model),
            "--batch", "4", "--workers", "1"]
    assert run_cli(*args) == 2
    line = one_line_error(capsys)
    assert reason in line and "rerun the same command to resume" in line
    recs = read_manifest(out)
    assert len(recs) == 4  # what is recorded stays; nothing unrecorded is left behind
    assert outputs(out) == {r["output"] for r in recs.values()}
    assert not list(out.rglob(".*.part*"))
    monkeypatch.setattr(local, "write_atomic", real)
    assert run_cli(*args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed"] == 4 and summary["ok"] == 10


# -- 7. a recorded output that was damaged later is redone ----------------------------------------


def test_a_truncated_output_is_redone(tiny_model, image_folder, tmp_path):
    out = tmp_path / "out"
    job = FolderJob(image_folder, out, model=tiny_model, classifier="none")
    purify_folder(job)
    good = (out / "a/img2.png").read_bytes()
    assert read_manifest(out)["a/img2.png"]["bytes"] == len(good)
    (out / "a/img2.png").write_bytes(b"")
    s = purify_folder(job)
    assert s.resumed == 9 and s.ok == 10
    assert (out / "a/img2.png").read_bytes() == good


# -- 8. links out of the input folder -------------------------------------------------------------


def test_links_out_of_the_input_folder_are_not_followed(tiny_model, image_folder, tmp_path):
    outside = tmp_path / "outside.png"
    outside.write_bytes((image_folder / "a/img0.png").read_bytes())
    (image_folder / "passwd.png").symlink_to("/etc/passwd")
    (image_folder / "outside.png").symlink_to(outside)
    (image_folder / "inside.png").symlink_to(image_folder / "a/img1.png")
    out = tmp_path / "out"
    args = ["--input", str(image_folder), "--output", str(out), "--model", str(tiny_model)]
    assert run_cli(*args) == 1
    recs = read_manifest(out)
    for name in ("passwd.png", "outside.png"):
        assert recs[name]["status"] == "error"
        assert recs[name]["error"].endswith(
            "symlink outside the input folder; --follow-symlinks to allow")
    assert recs["inside.png"]["status"] == "ok"
    assert run_cli(*args, "--follow-symlinks") == 1  # passwd.png: not an image
    recs = read_manifest(out)
    assert recs["outside.png"]["status"] == "ok"
    assert "not a recognised image" in recs["passwd.png"]["error"]


# -- 9. one run at a time on an output folder ------------------------------------------------------


def test_a_second_run_on_a_locked_folder_says_who_holds_it(tiny_model, image_folder, tmp_path,
                                                           capsys):
    out = tmp_path / "out"
    with guard.output_lock(out):
        assert run_cli("--input", str(image_folder), "--output", str(out), "--model",
                       str(tiny_model)) == 2
        line = one_line_error(capsys)
        assert f"pid {os.getpid()}" in line and os.uname().nodename in line
        assert not (out / "run.json").exists()
    assert run_cli("--input", str(image_folder), "--output", str(out), "--model",
                   str(tiny_model)) == 0  # released


# -- issue 10: checks before writing; every run's summary; what ran --------------------------------


def test_a_refused_loader_leaves_nothing(tiny_model, image_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli("--input", str(image_folder), "--output", str(out), "--model",
                   str(tiny_model), "--device", "cpu", "--loader", "nvjpeg") == 2
    assert "nvjpeg" in one_line_error(capsys)
    assert not out.exists()


def test_summary_keeps_every_run_and_what_ran(tiny_model, image_folder, tmp_path):
    out = tmp_path / "out"
    purify_folder(FolderJob(image_folder, out, model=tiny_model, classifier="none",
                            device="cpu", loader="cpu"))
    (out / "a/img3.png").unlink()
    purify_folder(FolderJob(image_folder, out, model=tiny_model, classifier="none",
                            device="cpu", loader="cpu"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] == 10 and summary["resumed"] == 9
    runs = summary["runs"]
    assert [r["ok"] for r in runs] == [10, 1] and [r["resumed"] for r in runs] == [0, 9]
    for r in runs:
        assert r["backend"]["backend"] == "reference" and r["backend"]["precision"] == "fp32"
        assert r["loader"] == "cpu"
    ran = json.loads((out / "run.json").read_text())["ran"]
    assert ran["loader"] == "cpu" and ran["backend"]["backend"] == "reference"


# -- 10. batch size: the conversion is not batch-dependent; the bound is stated -------------------


def test_16_bit_and_palette_inputs_do_not_depend_on_the_batch(tiny_model, image_folder, tmp_path):
    from apudae_engine.images.loaders import get_loader

    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((40, 40)) * 65535).astype(np.uint16)).save(
        image_folder / "deep.png")
    Image.fromarray((rng.random((28, 28, 3)) * 255).astype(np.uint8)).convert(
        "P", palette=Image.Palette.ADAPTIVE).save(image_folder / "palette.png")
    files = sorted(image_folder.rglob("*.png"))
    with get_loader("cpu", "cpu") as loader:
        whole = loader.load_batch(files, (1, 28, 28), 10**6).images
        one = torch.cat([loader.load_batch([f], (1, 28, 28), 10**6).images for f in files])
    assert torch.equal(whole, one)  # decoding is per file: bit-identical whatever the batch
    a, b = tmp_path / "a", tmp_path / "b"
    seed = PurifyConfig(seed=0)
    purify_folder(FolderJob(image_folder, a, batch_size=1, model=tiny_model, classifier="none",
                            config=seed))
    purify_folder(FolderJob(image_folder, b, batch_size=17, model=tiny_model, classifier="none",
                            config=seed))
    ra, rb = read_manifest(a), read_manifest(b)
    for path in ra:  # the README's bound: r to 1e-5, 8-bit outputs within one level
        assert ra[path]["r_before"] == pytest.approx(rb[path]["r_before"], abs=1e-5)
        x = np.asarray(Image.open(a / ra[path]["output"]), np.int16)
        y = np.asarray(Image.open(b / rb[path]["output"]), np.int16)
        assert np.abs(x - y).max() <= 1, path


# -- all of it at once ----------------------------------------------------------------------------


def test_a_hostile_folder_gives_one_record_per_input_and_no_traceback(tiny_model, image_folder,
                                                                      tmp_path, capsys):
    img = (image_folder / "a/img0.png").read_bytes()
    (image_folder / "x.png").write_bytes(img)
    Image.open(image_folder / "a/img0.png").save(image_folder / "x.jpg")
    (image_folder / "CASE.PNG").write_bytes(img)
    (image_folder / "CASE.png").write_bytes(img)
    with open(os.path.join(os.fsencode(image_folder), b"bad\xff.png"), "wb") as f:
        f.write(img)
    (image_folder / "passwd.png").symlink_to("/etc/passwd")
    (image_folder / "loop.png").symlink_to(image_folder / "loop.png")
    (image_folder / "empty.png").write_bytes(b"")
    (image_folder / "trunc.png").write_bytes(img[:40])
    Image.fromarray(np.full((28, 28), 40000, np.uint16)).save(image_folder / "deep.png")
    Image.new("P", (30, 30), 3).save(image_folder / "pal.png")
    Image.new("L", (300, 300)).save(image_folder / "big.png")
    n_inputs = 10 + 12
    out = tmp_path / "out"
    code = run_cli("--input", str(image_folder), "--output", str(out), "--model",
                   str(tiny_model), "--batch", "3", "--max-pixels", "50000")
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    recs = read_manifest(out)
    assert len(recs) == n_inputs
    failed = {p for p, r in recs.items() if r["status"] == "error"}
    assert failed == {"passwd.png", "loop.png", "empty.png", "trunc.png", "big.png"}
    assert len({r["output"].casefold() for r in recs.values() if "output" in r}) == \
        n_inputs - len(failed)


def test_a_name_as_long_as_the_file_system_allows_is_written(tiny_model, image_folder, tmp_path):
    """The temporary file of an atomic write must fit NAME_MAX whenever the name does."""
    long = "n" * 251 + ".png"
    (image_folder / long).write_bytes((image_folder / "a/img0.png").read_bytes())
    out = tmp_path / "out"
    assert purify_folder(FolderJob(image_folder, out, model=tiny_model,
                                   classifier="none")).ok == 11
    assert (out / long).is_file()
