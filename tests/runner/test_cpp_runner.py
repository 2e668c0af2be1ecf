"""The C++ runner (CMake + libtorch + AOTInductor) purifies images exactly as the reference."""

from __future__ import annotations

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
pytestmark = pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("c++") is None,
                                reason="needs cmake and a C++ compiler")


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> Path:
    build = tmp_path_factory.mktemp("build")
    prefix = torch.utils.cmake_prefix_path
    subprocess.run(["cmake", "-S", str(REPO), "-B", str(build), f"-DCMAKE_PREFIX_PATH={prefix}"],
                   check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, capture_output=True)
    return build / "apudae-runner"


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    from apudae_engine.backends.aoti import package_step
    from apudae_engine.backends.export import export_step

    torch.manual_seed(0)
    dae = REDNet(channels=1, layers=2, width=8).eval()
    folder = tmp_path_factory.mktemp("step")
    images = torch.rand(5, 1, 16, 16)
    r = reconstruction_error(dae, images)
    mu, sigma = float(r.min()) * 0.8, float(r.std()) + 1e-3  # every image starts active
    package_step(dae, (1, 16, 16), folder / "step.pt2", max_batch=64)
    meta = export_step(dae, (1, 16, 16), folder / "meta", mu=mu, sigma=sigma, onnx=False)["json"]
    return dae, folder / "step.pt2", meta, mu, sigma


def _write_pgms(folder: Path, n: int, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"img{i}.pgm"
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), "L").save(p)
        paths.append(p)
    return paths


def test_runner_matches_reference(runner, packaged, tmp_path):
    dae, package, meta, mu, sigma = packaged
    files = _write_pgms(tmp_path, 5, seed=1)
    out = tmp_path / "out"
    res = subprocess.run([str(runner), "--package", str(package), "--meta", str(meta), "--out",
                          str(out), "--seed", "7", *map(str, files)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    x = torch.stack([torch.from_numpy(np.array(Image.open(f))).float().div(255)[None]
                     for f in files])
    with torch.no_grad():
        ref = adaptive_purify(dae, x, mu, sigma, PurifyConfig(seed=7))
    expected = np.rint(ref.images.numpy() * 255).astype(np.int16)
    rows = [line.split("\t") for line in res.stdout.strip().splitlines()]
    assert [Path(r[0]).name for r in rows] == [f.name for f in files]
    for i, f in enumerate(files):
        got = np.array(Image.open(out / f.name), np.int16)
        assert np.abs(got - expected[i, 0]).max() <= 1  # 8-bit rounding edge at most
        assert float(rows[i][1]) == pytest.approx(float(ref.error_before[i]), rel=1e-4)
    assert not np.array_equal(expected[:, 0], np.stack([np.array(Image.open(f)) for f in files]))


def test_runner_reports_bad_files_and_continues(runner, packaged, tmp_path):
    _, package, meta, _, _ = packaged
    good = _write_pgms(tmp_path, 1, seed=2)[0]
    wrong_size = tmp_path / "big.pgm"
    Image.new("L", (20, 16)).save(wrong_size)
    junk = tmp_path / "junk.pgm"
    junk.write_bytes(b"P5\n16 16\n255\n" + b"\x00" * 10)
    res = subprocess.run([str(runner), "--package", str(package), "--meta", str(meta), "--out",
                          str(tmp_path / "o"), str(wrong_size), str(junk), str(good),
                          str(tmp_path / "missing.pgm")], capture_output=True, text=True)
    assert res.returncode == 1
    assert "big.pgm: image is 1x16x20 but the model takes 1x16x16" in res.stderr
    assert "junk.pgm: truncated raster" in res.stderr
    assert "missing.pgm: cannot open file" in res.stderr
    assert (tmp_path / "o" / good.name).is_file()


def test_runner_usage_error(runner):
    res = subprocess.run([str(runner), "--bogus"], capture_output=True, text=True)
    assert res.returncode == 2 and "unknown option --bogus" in res.stderr
