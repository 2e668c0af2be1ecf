"""End-to-end throughput: a folder of JPEGs to a folder of purified PNGs, per loader.

Three figures per (image size, loader), measured in the same run on the same files:

- ``decode``: the loader alone (``Loader.load_batch`` over every batch): the decode ceiling;
- ``purify``: the compute of ``purify_folder`` alone (purify, r after, the classifier when the
  model has one) on tensors decoded beforehand: the purify ceiling;
- ``e2e``: ``purify_folder`` from files to PNGs plus manifest, model loading excluded.

``ratio`` is e2e / purify: 1.0 means decoding and writing are completely hidden.

Images: 28x28 grayscale from the Fashion-MNIST test split (the bundled ``fmnist`` model; smooth
synthetic images when the dataset is not installed); 32x32 and 224x224 synthetic RGB images with a
REDNet of random weights and a calibration measured on those images, saved as a temporary
checkpoint. Run ``python -m apudae_engine.perf.bench_e2e --help``.

On a CPU shared with other processes, run with ``OMP_WAIT_POLICY=PASSIVE``. libgomp's threads
spin at every barrier, and it throttles the spinning only once more threads use OpenMP than
there are cores. So a pipeline whose loader thread touches torch made the purify stage up to
8x faster than the same purify loop alone on a loaded 2-core machine. Without the variable,
the ceiling and the end-to-end rate are not comparable.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from apudae_engine.core.choices import BACKEND_CHOICES, PRECISIONS
from apudae_engine.core.host import describe, synchronize
from apudae_engine.folder.local import FolderJob, path_identity, purify_folder
from apudae_engine.images.loaders import LOADERS, get_loader, loader_unavailable_reason

log = logging.getLogger(__name__)
DEFAULT_COUNTS = {28: 2000, 32: 256, 224: 16}


def smooth_images(n: int, size: int, channels: int, seed: int) -> np.ndarray:
    """Photo-like uint8 (n, size, size, channels): upsampled noise, so JPEG sizes are realistic."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, channels), np.uint8)
    for i in range(n):
        coarse = rng.integers(0, 256, (max(2, size // 6),) * 2 + (channels,), dtype=np.uint8)
        im = Image.fromarray(coarse[..., 0] if channels == 1 else coarse)
        im = np.asarray(im.resize((size, size), Image.Resampling.BICUBIC))
        out[i] = im.reshape(size, size, channels)
    return out


def make_jpegs(folder: Path, size: int, count: int, quality: int = 90) -> Path:
    """``count`` JPEGs of ``size`` x ``size`` in ``folder`` (gray for 28, RGB otherwise)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    images = None
    if size == 28:
        try:
            from apudae_engine.images.datasets import load_dataset

            ds = load_dataset("fashion-mnist", "test")
            images = ds.images[:count, 0].numpy()[..., None]
        except Exception as exc:  # the dataset is optional; the timing does not depend on it
            log.warning("Fashion-MNIST unavailable (%s); using synthetic 28x28 images", exc)
    if images is None or len(images) < count:
        images = smooth_images(count, size, 1 if size == 28 else 3, seed=size)
    for i, a in enumerate(images[:count]):
        Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(
            folder / f"{i:06d}.jpg", quality=quality)
    return folder


def random_rednet_checkpoint(stem: Path, size: int, layers: int, width: int,
                             images: torch.Tensor) -> Path:
    """A REDNet with random weights and a calibration measured on ``images`` (uint8 NCHW)."""
    from apudae_engine.method.checkpoint import CheckpointMeta, save_checkpoint
    from apudae_engine.method.models import REDNet
    from apudae_engine.method.purification import reconstruction_errors

    torch.manual_seed(0)
    dae = REDNet(channels=3, layers=layers, width=width).eval()
    r = reconstruction_errors(dae, images).double()
    cal = {"mu": float(r.mean()), "sigma": float(r.std().clamp_min(1e-6)), "n": len(images),
           "data": f"benchmark images {size}x{size}"}
    return save_checkpoint(dae, stem, CheckpointMeta(
        "dae", (3, size, size), calibration=cal,
        training={"command": "bench_e2e: random weights, not trained"}))


def bench_size(size: int, count: int, loaders: list[str], work: Path, batch: int, workers: int,
               device: torch.device, layers: int, width: int,
               repeat: int = 1, backend: str = "reference",
               precision: str = "fp32") -> list[dict[str, Any]]:
    """Decode, purify and e2e images/s for one image size and each usable loader.

    With ``repeat`` > 1 the purify and e2e measurements alternate and the fastest of each
    counts, so that load from other processes on a shared machine biases neither."""
    from apudae_engine.backends.purifier import Purifier
    from apudae_engine.folder.local import load_job_classifier

    folder = make_jpegs(work / f"jpeg{size}", size, count)
    files = sorted(folder.glob("*.jpg"))
    if size == 28:
        model: str | Path = "fmnist"
    else:
        with get_loader("cpu", "cpu", workers) as cpu:
            sample = cpu.load_batch(files[:64], (3, size, size), 10**9).images
        model = random_rednet_checkpoint(work / f"dae{size}" / "dae", size, layers, width,
                                         (sample * 255).round().to(torch.uint8))
    job = FolderJob(folder, work / "out", batch_size=batch, model=model, device=str(device),
                    workers=workers, overwrite=True, backend=backend, precision=precision)
    purifier = Purifier.from_pretrained(model, job.config, device, backend, precision)
    clf, _, _ = load_job_classifier(job, device) or (None, None, None)
    shape = purifier.input_shape
    ids = torch.tensor([path_identity(f.name) for f in files], dtype=torch.int64, device=device)

    @torch.no_grad()
    def compute(x: torch.Tensor, idx: torch.Tensor) -> None:  # what purify_folder computes
        out = purifier.purify(x, idx).images
        purifier.reconstruction_error(out)
        if clf is not None:
            clf(x).argmax(1).tolist()
            clf(out).argmax(1).tolist()

    results = []
    for name in loaders:
        reason = loader_unavailable_reason(name, device)
        if reason is not None:
            log.info("skipping loader %s: %s", name, reason)
            continue
        with get_loader(name, device, workers) as loader:
            loader.load_batch(files[:batch], shape, 10**9)  # warm-up (DALI builds its pipeline)
            t0 = time.perf_counter()
            decoded = []
            for i in range(0, len(files), batch):
                decoded.append(loader.load_batch(files[i:i + batch], shape, 10**9).images)
            synchronize(device)
            t_decode = time.perf_counter() - t0
        compute(decoded[0][: min(batch, 64)], ids[: min(batch, 64)])  # warm-up
        t_purify, e2e = float("inf"), None
        for _ in range(repeat):
            synchronize(device)
            t0 = time.perf_counter()
            for k, x in enumerate(decoded):
                compute(x, ids[k * batch:k * batch + len(x)])
            synchronize(device)
            t_purify = min(t_purify, time.perf_counter() - t0)
            run = _run_e2e(job, name, count)
            e2e = run if e2e is None or run["seconds"] < e2e["seconds"] else e2e
        del decoded
        row = {"size": size, "loader": name, "count": count, "batch": batch, "repeat": repeat,
               "decode_ips": round(count / t_decode, 1),
               "purify_ips": round(count / t_purify, 2),
               "e2e_ips": e2e and e2e["images_per_second"],
               "ratio_e2e_purify": e2e and round(t_purify / e2e["seconds"], 3),
               "model": str(model) if size == 28 else f"REDNet(3, layers={layers}, "
                                                      f"width={width}) random", "e2e": e2e}
        log.info("%s", json.dumps(row))
        results.append(row)
    return results


def _run_e2e(job: FolderJob, loader: str, count: int) -> dict[str, Any]:
    shutil.rmtree(job.output_dir, ignore_errors=True)
    t0 = time.perf_counter()
    summary = purify_folder(dataclasses.replace(job, loader=loader))
    t_all = time.perf_counter() - t0
    # Model loading and set-up are not throughput: the summary's clock starts at the first
    # batch and stops after the last record.
    return {"seconds": round(summary.seconds, 3), "with_setup_seconds": round(t_all, 3),
            "images_per_second": round(count / summary.seconds, 2),
            "stage_seconds": {k: round(v, 3) for k, v in summary.stage_seconds.items()}}


def machine() -> dict[str, Any]:
    """Hardware and versions recorded with every result."""
    return {**describe(packages=("PIL", "nvidia.dali")), "dtype": "float32"}


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| size | loader | images | decode img/s | purify img/s | e2e img/s | e2e/purify |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        e2e = "n/a" if r["e2e_ips"] is None else f"{r['e2e_ips']:.1f}"
        ratio = "n/a" if r["ratio_e2e_purify"] is None else f"{r['ratio_e2e_purify']:.3f}"
        lines.append(f"| {r['size']}x{r['size']} | {r['loader']} | {r['count']} | "
                     f"{r['decode_ips']:.0f} | {r['purify_ips']:.1f} | {e2e} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m apudae_engine.perf.bench_e2e", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[28, 32, 224])
    p.add_argument("--count", type=int, nargs="+", default=None,
                   help="images per size, in --sizes order (default 2000 / 256 / 16)")
    p.add_argument("--loaders", nargs="+", default=list(LOADERS), choices=list(LOADERS))
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--layers", type=int, default=4, help="REDNet blocks a side for 32/224")
    p.add_argument("--width", type=int, default=48, help="REDNet channels for 32/224")
    p.add_argument("--repeat", type=int, default=1, help="alternate purify-only and e2e this "
                   "many times and keep the fastest of each (shared machines)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--backend", default="reference", choices=BACKEND_CHOICES,
                   help="the purify backend of both the ceiling and the end-to-end run")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from apudae_engine.core.host import resolve_device

    device = resolve_device(a.device)
    counts = a.count or [DEFAULT_COUNTS.get(s, 64) for s in a.sizes]
    if len(counts) != len(a.sizes):
        p.error("--count needs one number per size")
    rows = []
    with tempfile.TemporaryDirectory(prefix="apudae-bench-") as tmp:
        for size, count in zip(a.sizes, counts):
            rows += bench_size(size, count, a.loaders, Path(tmp), a.batch, a.workers, device,
                               a.layers, a.width, a.repeat, a.backend, a.precision)
    info = machine() | {"device": str(device), "backend": a.backend, "precision": a.precision}
    print(json.dumps(info))
    print(format_table(rows))
    if a.json:
        a.json.write_text(json.dumps({"machine": info, "results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
