"""The C++ runner (CMake + libtorch + AOTInductor) runs the exported whole purification and
purifies PNG, PGM and PPM images exactly as the reference; it holds none of the maths."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apudae_engine.method.config import PurifyConfig
from apudae_engine.method.models import REDNet
from apudae_engine.method.purification import adaptive_purify, reconstruction_error

REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO / "runner" / "apudae_runner.cpp"
CONFIG = PurifyConfig(steps=4, seed=3)
pytestmark = pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("c++") is None,
                                reason="needs cmake and a C++ compiler")


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    build = tmp_path_factory.mktemp("build")
    prefix = torch.utils.cmake_prefix_path
    subprocess.run(["cmake", "-S", str(REPO), "-B", str(build), f"-DCMAKE_PREFIX_PATH={prefix}"],
                   check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, capture_output=True)
    return build


@pytest.fixture(scope="module")
def runner(build) -> Path:
    return build / "apudae-runner"


@pytest.fixture(scope="module")
def png(build) -> None:
    """Skip PNG cases when the build found no libpng (Debian: libpng-dev)."""
    if "PNG_LIBRARY_RELEASE:FILEPATH=/" not in (build / "CMakeCache.txt").read_text():
        pytest.skip("the runner was built without libpng (apt-get install libpng-dev)")


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    from apudae_engine.backends.aoti import package_whole
    from apudae_engine.backends.export import export_whole

    torch.manual_seed(0)
    dae = REDNet(channels=1, layers=2, width=8).eval()
    folder = tmp_path_factory.mktemp("whole")
    r = reconstruction_error(dae, torch.rand(8, 1, 16, 16)).detach()
    mu, sigma = float(r.min()) * 0.8, float(r.std()) + 1e-3  # every image starts active
    threshold = float(r.median())
    paths = export_whole(dae, (1, 16, 16), folder / "whole", mu, sigma, CONFIG, threshold,
                         max_batch=64, onnx=False)
    package = package_whole(paths["json"])
    return dae, package, paths["json"], mu, sigma, threshold


def _write(folder: Path, n: int, seed: int, suffix: str) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"img{i}{suffix}"
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), "L").save(p)
        paths.append(p)
    return paths


def _run(runner, packaged, out, files, *extra):
    _, package, meta, *_ = packaged
    return subprocess.run([str(runner), "--package", str(package), "--meta", str(meta), "--out",
                           str(out), *extra, *map(str, files)], capture_output=True, text=True)


@pytest.mark.parametrize("suffix", [".pgm", ".png"])
def test_runner_matches_reference(runner, packaged, tmp_path, suffix, request):
    if suffix == ".png":
        request.getfixturevalue("png")
    dae, _, _, mu, sigma, threshold = packaged
    files = _write(tmp_path, 5, seed=1, suffix=suffix)
    out = tmp_path / "out"
    res = _run(runner, packaged, out, files, "--seed", "7", "--batch", "3")  # two batches
    assert res.returncode == 0, res.stderr
    x = torch.stack([torch.from_numpy(np.array(Image.open(f))).float().div(255)[None]
                     for f in files])
    with torch.no_grad():
        ref = adaptive_purify(dae, x, mu, sigma, CONFIG.with_(seed=7))
        r_after = reconstruction_error(dae, ref.images)
    expected = np.rint(ref.images.numpy() * 255).astype(np.int16)
    rows = [line.split("\t") for line in res.stdout.strip().splitlines()]
    assert [Path(r[0]).name for r in rows] == [f.name for f in files]
    for i, f in enumerate(files):
        written = Image.open(out / f.name)
        assert written.format == ("PNG" if suffix == ".png" else "PPM")
        got = np.array(written, np.int16)
        assert np.abs(got - expected[i, 0]).max() <= 1  # 8-bit rounding edge at most
        assert float(rows[i][1]) == pytest.approx(float(ref.error_before[i]), rel=1e-4)
        assert float(rows[i][2]) == pytest.approx(float(r_after[i]), rel=1e-3)
        assert int(rows[i][3]) == int(ref.active_steps[i])
        assert rows[i][4] == str(int(float(ref.error_before[i]) > threshold))
    assert not np.array_equal(expected[:, 0], np.stack([np.array(Image.open(f)) for f in files]))


def test_runner_default_seed_is_the_exported_one(runner, packaged, tmp_path):
    dae, _, _, mu, sigma, _ = packaged
    files = _write(tmp_path, 2, seed=4, suffix=".pgm")
    res = _run(runner, packaged, tmp_path / "out", files)
    assert res.returncode == 0, res.stderr
    x = torch.stack([torch.from_numpy(np.array(Image.open(f))).float().div(255)[None]
                     for f in files])
    with torch.no_grad():
        ref = adaptive_purify(dae, x, mu, sigma, CONFIG)
    got = np.stack([np.array(Image.open(tmp_path / "out" / f.name), np.int16) for f in files])
    assert np.abs(got - np.rint(ref.images[:, 0].numpy() * 255)).max() <= 1


def test_runner_holds_no_copy_of_the_maths():
    code = re.sub(r"//[^\n]*", "", SOURCE.read_text())  # comments may name what the graph does
    for word in ("mix32", "fingerprint", "0x9E3779B9", "0x7FEB352D", "beta1", "beta2", "adam",
                 "hinge", "noise", "sqrt", "mu", "sigma", "clamp_min"):
        assert not re.search(rf"\b{word}\b", code, re.IGNORECASE), word


def test_runner_reports_bad_files_and_continues(runner, packaged, png, tmp_path):
    good = _write(tmp_path, 1, seed=2, suffix=".png")[0]
    wrong_size = tmp_path / "big.pgm"
    Image.new("L", (20, 16)).save(wrong_size)
    junk = tmp_path / "junk.pgm"
    junk.write_bytes(b"P5\n16 16\n255\n" + b"\x00" * 10)
    colour = tmp_path / "colour.png"
    Image.new("RGB", (16, 16)).save(colour)
    not_png = tmp_path / "text.png"
    not_png.write_text("hello")
    res = _run(runner, packaged, tmp_path / "o", [wrong_size, junk, colour, not_png, good,
                                                  tmp_path / "missing.pgm"])
    assert res.returncode == 1
    assert "big.pgm: image is 1x16x20 but the model takes 1x16x16" in res.stderr
    assert "junk.pgm: truncated raster" in res.stderr
    assert "colour.png: image is RGB but the model takes grey images" in res.stderr
    assert "text.png: not a readable PNG" in res.stderr
    assert "missing.pgm: cannot open file" in res.stderr
    assert (tmp_path / "o" / good.name).is_file()


def test_runner_refuses_a_step_graph_sidecar(runner, packaged, tmp_path):
    _, package, *_ = packaged
    step = tmp_path / "step.json"
    step.write_text('{"format": "apudae-engine/step-graph"}')
    res = subprocess.run([str(runner), "--package", str(package), "--meta", str(step), "--out",
                          str(tmp_path / "o"), "x.png"], capture_output=True, text=True)
    assert res.returncode == 2 and "not a whole-purification export" in res.stderr


def test_runner_usage_error(runner):
    res = subprocess.run([str(runner), "--bogus"], capture_output=True, text=True)
    assert res.returncode == 2 and "unknown option --bogus" in res.stderr
