"""Ray Data integration: the map_batches callable, purify_dataset and `purify-ray`.

The callable is tested in-process (no Ray needed); the Ray tests share one local Ray
(2 CPUs, no dashboard) for the module and skip when ray is not installed.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from synthetic import make_digits

from apudae_engine.cli import main
from apudae_engine.core.errors import UserError
from apudae_engine.folder.local import FolderJob, path_identity, purify_folder
from apudae_engine.folder.ray_dataset import PurifyBatches
from apudae_engine.method.config import PurifyConfig

# The adaptive noise only shows on images whose error is off the calibration; these are.
NOISY = np.clip(make_digits(6, seed=3).astype(int) + np.random.default_rng(0).integers(
    -60, 60, (6, 28, 28)), 0, 255).astype(np.uint8)


def read_manifest(out: Path) -> dict[str, dict]:
    lines = (out / "manifest.jsonl").read_text().splitlines()
    return {r["path"]: r for r in map(json.loads, lines)}


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def png_arrays(root: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(root)): read_png(p) for p in sorted(root.rglob("*.png"))}


def assert_same_records(got: dict[str, dict], want: dict[str, dict]) -> None:
    """The same fields and values; r to the batch-independence bound."""
    for path, rec in want.items():
        assert got[path].keys() == rec.keys(), path
        for key, value in rec.items():
            if key.startswith("r_"):
                assert got[path][key] == pytest.approx(value, abs=2e-6)
            else:
                assert got[path][key] == value, (path, key)


def paths_of(root: Path) -> list[Path]:
    return sorted(root.rglob("*.png"))


@pytest.fixture(scope="module")
def fn(tiny_model) -> PurifyBatches:
    return PurifyBatches(tiny_model, backend="reference")


@pytest.fixture
def local_run(tiny_model, image_folder, tmp_path) -> Path:
    out = tmp_path / "local"
    assert purify_folder(FolderJob(image_folder, out, batch_size=4, model=tiny_model,
                                   config=PurifyConfig(seed=0))).ok == 10
    return out


# -- the callable, in-process ------------------------------------------------------------------


def test_batches_equal_purify_folder_whatever_the_split(tiny_model, image_folder, local_run):
    fn = PurifyBatches(tiny_model, PurifyConfig(seed=0), root=image_folder, backend="reference")
    files = paths_of(image_folder)
    images = np.stack([read_png(f) for f in files])  # (N, H, W) uint8
    paths = np.array([str(f) for f in files], dtype=object)
    expected = png_arrays(local_run)
    manifest = read_manifest(local_run)
    for size in (3, 7):
        parts = [fn({"image": images[i:i + size], "path": paths[i:i + size]})
                 for i in range(0, len(files), size)]
        out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        for i, f in enumerate(files):
            rel = str(f.relative_to(image_folder))
            np.testing.assert_array_equal(out["image"][i, :, :, 0], expected[rel])
            rec = manifest[rel]
            assert out["r_before"][i] == pytest.approx(rec["r_before"], abs=2e-6)
            assert out["r_after"][i] == pytest.approx(rec["r_after"], abs=2e-6)
            assert out["active_steps"][i] == rec["active_steps"]
            assert out["label_after"][i] == rec["label_after"]
            assert out["class_after"][i] == rec["class_after"]
            assert out["image_id"][i] == path_identity(rel)
        assert list(out["path"]) == list(paths)  # other columns pass through


def test_noise_is_keyed_by_id_not_by_position(fn):
    ids = np.arange(6, dtype=np.int64)
    a = fn({"image": NOISY, "id": ids})
    b = fn({"image": NOISY[::-1], "id": ids[::-1]})  # same pairs, other positions
    np.testing.assert_array_equal(a["image"], b["image"][::-1])
    c = fn({"image": NOISY, "id": ids + 100})
    assert (a["image"] != c["image"]).any()  # the identity does key the noise
    named = fn({"image": NOISY, "id": np.array([f"img{i}" for i in range(6)], object)})
    assert list(named["image_id"]) == [path_identity(f"img{i}") for i in range(6)]
    # Without path or id, a pixel fingerprint keys it: equal images, equal outputs.
    d = fn({"image": np.stack([NOISY[0], NOISY[1], NOISY[0]])})
    np.testing.assert_array_equal(d["image"][0], d["image"][2])
    assert d["image_id"][0] == d["image_id"][2] != d["image_id"][1]


def test_layouts_and_conversion_follow_the_decoding_policy(fn):
    rgb = np.random.default_rng(1).integers(0, 256, (56, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    ids = np.array([7], np.int64)
    decoded = fn({"bytes": np.array([buf.getvalue()], object), "id": ids})["image"]
    for cell in (rgb, rgb.transpose(2, 0, 1), rgb.astype(np.float32) / 255):
        out = fn({"image": cell[None], "id": ids})["image"]
        np.testing.assert_array_equal(out, decoded)  # luminance + bicubic resize, like a file
    grey = NOISY[:1]
    as_float = fn({"image": grey[:, None].astype(np.float32) / 255, "id": ids})
    as_hwc = fn({"image": grey[..., None], "id": ids})
    np.testing.assert_array_equal(as_float["image"], as_hwc["image"])
    assert as_hwc["image"].shape == (1, 28, 28, 1) and as_hwc["image"].dtype == np.uint8


@pytest.mark.parametrize("cell, message", [
    (np.zeros((2, 5, 28, 28), np.uint8), "shape (2, 5, 28, 28)"),
    (np.zeros((28, 28), np.int32), "dtype int32"),
    (np.full((28, 28), 1.5, np.float32), "outside [0, 1]"),
])
def test_unusable_image_raises_naming_the_row(fn, cell, message):
    with pytest.raises(UserError, match=r"data/x\.png") as err:
        fn({"image": [np.zeros((28, 28), np.uint8), cell],
            "path": np.array(["data/y.png", "data/x.png"], object)})
    assert message in str(err.value)


def test_undecodable_bytes_become_error_rows(fn):
    good = io.BytesIO()
    Image.fromarray(NOISY[0]).save(good, format="PNG")
    out = fn({"bytes": np.array([b"", good.getvalue(), b"not an image"], object),
              "path": np.array(["e.png", "g.png", "t.jpg"], object)})
    assert list(out["status"]) == ["error", "ok", "error"]
    assert out["error"][0] == "e.png: empty file (0 bytes)"
    assert out["error"][2] == "t.jpg: not a recognised image format"
    assert np.isnan(out["r_before"][0]) and out["label_after"][2] == -1
    assert not out["image"][0].any() and out["image"][1].any()


def test_without_ray_the_command_says_what_to_install(tiny_model, image_folder, tmp_path,
                                                      monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    code = main(["purify-ray", "--input", str(image_folder), "--output", str(tmp_path / "o"),
                 "--model", str(tiny_model)])
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'apudae-engine[ray]'" in err and "Traceback" not in err


def test_import_and_help_do_not_import_ray():
    code = ("import sys, apudae_engine; from apudae_engine.cli import main\n"
            "try:\n    main(['purify-ray', '--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'ray' not in sys.modules and 'torch' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


# -- on a local Ray -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_local():
    pytest.importorskip("ray.data", reason="Ray Data not installed (pip install "
                        "'apudae-engine[ray]')")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def test_dataset_results_do_not_depend_on_ray_batches(ray_local, tiny_model, image_folder,
                                                      local_run):
    from apudae_engine.folder.ray_dataset import purify_dataset

    expected = png_arrays(local_run)
    for size in (3, 7):
        ds = ray_local.data.read_images(str(image_folder), include_paths=True)
        rows = purify_dataset(ds, tiny_model, PurifyConfig(seed=0), root=image_folder,
                              batch_size=size, backend="reference",
                              concurrency=1).take_all()
        got = {str(Path(r["path"]).relative_to(image_folder)): r for r in rows}
        assert sorted(got) == sorted(expected)
        for rel, arr in expected.items():
            np.testing.assert_array_equal(got[rel]["image"][:, :, 0], arr, err_msg=rel)
            assert got[rel]["status"] == "ok"


def test_unusable_image_error_reaches_the_driver(ray_local, tiny_model):
    from apudae_engine.folder.ray_dataset import purify_dataset
    from apudae_engine.folder.ray_run import _user_error

    ds = ray_local.data.from_items([{"image": np.zeros((5, 6, 7, 8), np.uint8),
                                     "path": "bad/shape.png"}])
    with pytest.raises(Exception) as err:
        purify_dataset(ds, tiny_model, concurrency=1).take_all()
    user = _user_error(err.value)
    assert isinstance(user, UserError) and "bad/shape.png: image of shape" in str(user)


def test_purify_ray_command_writes_what_purify_writes(ray_local, tiny_model, image_folder,
                                                      tmp_path):
    (image_folder / "empty.png").write_bytes(b"")
    (image_folder / "text.jpg").write_bytes(b"this is not a jpeg")
    Image.new("RGBA", (30, 30), (255, 0, 0, 128)).save(image_folder / "rgba.png")
    local, out = tmp_path / "local", tmp_path / "ray"
    args = ["--input", str(image_folder), "--model", str(tiny_model), "--batch", "4",
            "--seed", "0"]
    assert main(["purify", *args, "--output", str(local)]) == 1
    assert main(["purify-ray", *args, "--output", str(out), "--actors", "1"]) == 1
    want, got = read_manifest(local), read_manifest(out)
    assert sorted(got) == sorted(want) and len(got) == 13
    assert_same_records(got, want)
    mine, theirs = png_arrays(out), png_arrays(local)
    assert sorted(mine) == sorted(theirs)
    for rel, arr in theirs.items():
        np.testing.assert_array_equal(mine[rel], arr, err_msg=rel)
    # Resume: a lost output is redone, the rest is kept; the folder ends up the same.
    (out / "b" / "img7.png").unlink()
    before = {p: (out / p).stat().st_mtime_ns for p in ("a/img0.png", "rgba.png")}
    assert main(["purify-ray", *args, "--output", str(out), "--actors", "1"]) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed"] == 10 and summary["ok"] == 11 and summary["failed"] == 2
    assert all((out / p).stat().st_mtime_ns == t for p, t in before.items())
    assert (out / "b" / "img7.png").read_bytes() == (local / "b" / "img7.png").read_bytes()


def test_purify_ray_rejects_what_purify_rejects(ray_local, tiny_model, image_folder, tmp_path,
                                               flag_k):
    """Issue 19: --reject-flagged gives the same rejected records, no file for them, and a
    resumed run keeps them rejected."""
    local, out = tmp_path / "local", tmp_path / "ray"
    args = ["--input", str(image_folder), "--model", str(tiny_model), "--batch", "4",
            "--seed", "0", "--flag-k", flag_k, "--reject-flagged"]
    assert main(["purify", *args, "--output", str(local)]) == 0
    assert main(["purify-ray", *args, "--output", str(out), "--actors", "1"]) == 0
    want, got = read_manifest(local), read_manifest(out)
    rejected = {p for p, r in want.items() if r["status"] == "rejected"}
    assert len(rejected) == 5 and {p for p, r in got.items() if r["status"] == "rejected"} == \
        rejected
    assert_same_records(got, want)
    assert png_arrays(out).keys() == png_arrays(local).keys() == \
        {p for p in want if p not in rejected}
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["ok"], summary["rejected"]) == (5, 5)
    assert main(["purify-ray", *args, "--output", str(out), "--actors", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed"] == 10 and summary["rejected"] == 5
    assert read_manifest(out) == got and png_arrays(out).keys() == png_arrays(local).keys()


def test_purify_ray_records_hostile_names_and_respects_the_lock(ray_local, tiny_model,
                                                                image_folder, tmp_path, capsys):
    """Issue 12: a name that is not UTF-8 and a link out of the folder each get one error
    record (Ray cannot read the one, the other is refused); a locked folder is refused."""
    import os

    from apudae_engine.folder.guard import output_lock

    with open(os.path.join(os.fsencode(image_folder), b"bad\xff.png"), "wb") as f:
        f.write((image_folder / "a" / "img0.png").read_bytes())
    (image_folder / "passwd.png").symlink_to("/etc/passwd")
    out = tmp_path / "ray"
    args = ["purify-ray", "--input", str(image_folder), "--model", str(tiny_model), "--output",
            str(out), "--actors", "1", "--classifier", "none"]
    with output_lock(out):
        assert main(args) == 2
        assert f"pid {os.getpid()}" in capsys.readouterr().err
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    recs = read_manifest(out)
    assert len(recs) == 12
    assert "not valid UTF-8" in recs[os.fsdecode(b"bad\xff.png")]["error"]
    assert "symlink outside the input folder" in recs["passwd.png"]["error"]
    assert sum(r["status"] == "ok" for r in recs.values()) == 10
    ran = json.loads((out / "summary.json").read_text())["runs"][-1]["backend"]
    assert ran == {"requested": "reference", "backend": "reference", "precision": "fp32",
                   "fallback": None}  # as the actors' purifier reported it
