"""Checks that need a CUDA device; every test here skips without one (see tests/conftest.py).

They compare the GPU paths with the reference: the compiled engine's captured CUDA-graph loop
on new inputs and new shapes, reduced precision through ``verify_backend`` and its published
tolerances, the nvjpeg loader against Pillow, and a whole ``purify`` run on the GPU against
the same run on the CPU. ``scripts/gpu_check.sh`` runs them on a lent GPU machine.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apudae_engine.backends.selection import get_backend
from apudae_engine.core.numerics import ieee_fp32_convolutions
from apudae_engine.folder.local import FolderJob, purify_folder
from apudae_engine.images.loaders import get_loader
from apudae_engine.method.checkpoint import load_checkpoint
from apudae_engine.method.config import PurifyConfig
from apudae_engine.method.models import REDNet
from apudae_engine.method.purification import adaptive_purify, reconstruction_error
from apudae_engine.perf.verify import folder_images, verify_backend

pytestmark = pytest.mark.gpu
SAMPLES = Path(__file__).resolve().parents[2] / "engine" / "samples"


def _tiny_task(n: int, seed: int = 0):
    torch.manual_seed(seed)
    dae = REDNet(1, layers=2, width=8).eval().cuda()
    x = torch.rand(n, 1, 16, 16, device="cuda")
    with torch.no_grad():
        r = reconstruction_error(dae, x)
    return dae, float(r.median()) + 1e-3, float(r.std())


def test_captured_loop_follows_new_inputs_and_new_batch_sizes():
    dae, mu, sigma = _tiny_task(8)
    backend = get_backend("compiled", "cuda")
    gen = torch.Generator(device="cuda").manual_seed(1)
    batches = [torch.rand(n, 1, 16, 16, device="cuda", generator=gen) for n in (8, 8, 5, 8)]
    for x in batches:  # the second batch of 8 replays the graph captured for the first
        ids = torch.arange(x.shape[0], device="cuda") + 100
        got = backend.purify(dae, x, mu, sigma, PurifyConfig(seed=0), ids)
        with ieee_fp32_convolutions("cuda"):  # as the engine runs it; cuDNN defaults to TF32
            want = adaptive_purify(dae, x, mu, sigma, PurifyConfig(seed=0), ids)
        torch.testing.assert_close(got.error_before, want.error_before, rtol=1e-4, atol=1e-4)
        assert torch.equal(got.active_steps.cpu(), want.active_steps.cpu())
        assert (got.images - want.images).abs().max() < 4 / 255


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_compiled_backend_passes_verify_on_the_bundled_model(precision):
    dae = load_checkpoint("fmnist", "dae")
    clf = load_checkpoint("fmnist", "classifier")
    cal = dae.calibration
    images = folder_images(SAMPLES, dae.input_shape, None)
    rep = verify_backend(dae.model, images, cal["mu"], cal["sigma"], PurifyConfig(seed=0),
                         "compiled",
                         precision, "cuda", classifier=clf.model)
    assert rep.passed, rep.to_dict()


def _jpeg_folder(root: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i, (mode, size, sub) in enumerate([("RGB", (28, 28), 2), ("RGB", (33, 17), 0),
                                           ("L", (32, 32), 0), ("RGB", (64, 48), 1)]):
        yy, xx = np.mgrid[0:size[1], 0:size[0]]
        base = np.stack([(xx * 7 + yy * 3) % 256, (yy * 5) % 256, (xx * yy) % 256], -1)
        arr = np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)
        im = Image.fromarray(arr, "RGB").convert(mode)
        path = root / f"{i}.jpg"
        im.save(path, quality=90, subsampling=sub)
        paths.append(path)
    return paths


def test_nvjpeg_decodes_like_pillow_and_reports_a_corrupt_file(tmp_path):
    pytest.importorskip("torchvision", reason="nvjpeg needs torchvision")
    paths = _jpeg_folder(tmp_path)
    bad = tmp_path / "bad.jpg"
    buf = io.BytesIO()
    Image.new("RGB", (28, 28), (9, 9, 9)).save(buf, "JPEG")
    bad.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # truncated
    paths.insert(2, bad)
    shape = (3, 28, 28)
    with get_loader("cpu", "cpu") as cpu, get_loader("nvjpeg", "cuda") as gpu:
        want = cpu.load_batch(paths, shape, 10**8)
        got = gpu.load_batch(paths, shape, 10**8)
    assert got.ok == want.ok and sorted(got.errors) == sorted(want.errors) == [2]
    assert got.images.device.type == "cuda"
    diff = (got.images.cpu() - want.images).abs() * 255
    # JPEG decoders may differ in IDCT and chroma upsampling by a few levels; a gross error
    # (channel order, transposition, a wrong resize) differs by far more.
    assert float(diff.mean()) < 2.0 and float(diff.max()) <= 40, (float(diff.mean()),
                                                                  float(diff.max()))


def test_purify_on_the_gpu_matches_the_cpu_reference(tmp_path):
    runs = {}
    for device, backend in (("cpu", "reference"), ("cuda", "compiled")):
        out = tmp_path / device
        summary = purify_folder(FolderJob(SAMPLES, out, batch_size=16, device=device,
                                          backend=backend))
        assert summary.failed == 0 and summary.ok == 24
        runs[device] = {json.loads(line)["path"]: json.loads(line)
                        for line in (out / "manifest.jsonl").read_text().splitlines()}
    assert runs["cpu"].keys() == runs["cuda"].keys()
    diffs, agree = [], 0
    for path, rec in runs["cpu"].items():
        a = np.asarray(Image.open(tmp_path / "cpu" / rec["output"]), dtype=np.float64)
        b = np.asarray(Image.open(tmp_path / "cuda" / rec["output"]), dtype=np.float64)
        diffs.append(np.abs(a - b).mean())
        agree += rec["label_after"] == runs["cuda"][path]["label_after"]
    assert max(diffs) < 1.0, diffs  # mean difference per image, in 8-bit levels
    assert agree >= 22, agree
