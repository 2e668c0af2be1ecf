"""Throughput of the purification backends (``apudae-engine bench``).

For each case (model and image size) and batch size, every backend purifies the same images
with the adaptive method; the reference is timed in the same run, interleaved with the others
so that load on a shared machine hits all of them alike. Each backend is warmed up first
(compilation happens there), CUDA is synchronized inside the timed region, and the median of
``repeats`` runs is reported as images/s, the ratio to the reference, and the achieved
GFLOP/s against the machine's measured peak. The JSON record names the hardware, versions,
dtype, batch and image size.

GFLOP/s counts the convolution work of one full step (forward and input gradient) for every
image and step, whatever a backend skips: the compiled CPU backend takes the gradient only of
images whose hinge is active, so its rate is "effective"; ``active_fraction`` says how much
gradient work the data really asked for.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import statistics
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from apudae_engine.core.host import describe, load_average, synchronize
from apudae_engine.core.numerics import ieee_fp32_convolutions
from apudae_engine.method.config import PurifyConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Case:
    """A benchmark model: REDNet(channels, layers, width) on size x size images."""

    name: str
    channels: int
    size: int
    layers: int
    width: int
    model: str | None = None  # a checkpoint (name or path) to load instead of random weights
    heavy: bool = False  # skipped on the CPU unless asked for
    perturb: float = 0.0  # add +-perturb (random signs) to the images, like an L-inf attack

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.channels, self.size, self.size


CASES = {
    "fmnist": Case("fmnist", 1, 28, 4, 48, model="fmnist"),
    # Every image's hinge active at every step: the most gradient work (attacked inputs).
    "fmnist-perturbed": Case("fmnist-perturbed", 1, 28, 4, 48, model="fmnist", perturb=0.1),
    "rednet30-32": Case("rednet30-32", 3, 32, 15, 64),
    "rednet30-224": Case("rednet30-224", 3, 224, 15, 64, heavy=True),
}
DEFAULT_BATCHES = {
    "cpu": {"fmnist": (1, 64, 512), "fmnist-perturbed": (512,), "rednet30-32": (64,),
            "rednet30-224": (2,)},
    "cuda": {"fmnist": (1, 64, 512), "fmnist-perturbed": (512,), "rednet30-32": (64, 512),
             "rednet30-224": (8, 32)},
}


def tune_cpu_allocator() -> str | None:
    """Keep freed memory in glibc's heap instead of unmapping it: without this, every
    feature map (~20 MB at batch 512) is page-faulted in afresh on each use, which costs
    10-15 % of a CPU step. Applies to the whole process (every backend alike)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold,
                                                                        2**31 - 1)
    except (OSError, AttributeError):
        return None
    return "glibc mallopt M_MMAP_THRESHOLD=32MiB M_TRIM_THRESHOLD=2GiB" if ok else None


def hardware(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    return describe(device, packages=("triton",))


def _best_seconds(fn, device: torch.device, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return min(times)


@torch.no_grad()
def measure_peak(device: torch.device, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Achievable GFLOP/s here: a large matmul and a large 3x3 convolution (oneDNN/cuDNN)."""
    n = 4096 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    mm = 2 * n**3 / _best_seconds(lambda: a @ a, device) / 1e9
    conv = 0.0
    for c, hw, batch in ((256, 32, 8), (128, 16, 64)):  # oneDNN/cuDNN's best 3x3 shapes
        batch *= 1 if device.type == "cpu" else 8
        x = torch.randn(batch, c, hw, hw, device=device, dtype=dtype).contiguous(
            memory_format=torch.channels_last)
        w = torch.randn(c, c, 3, 3, device=device, dtype=dtype).contiguous(
            memory_format=torch.channels_last)
        with ieee_fp32_convolutions(device):  # the engine's fp32 (not TF32) on GPUs
            seconds = _best_seconds(
                lambda x=x, w=w: torch.nn.functional.conv2d(x, w, padding=1), device)
        conv = max(conv, 2 * batch * c * c * 9 * hw * hw / seconds / 1e9)
    return {"matmul_gflops": round(mm, 1), "conv3x3_gflops": round(conv, 1),
            "peak_gflops": round(max(mm, conv), 1)}


def step_flops(dae: nn.Module, shape: tuple[int, int, int]) -> int:
    """FLOPs of one step (forward and input gradient) for one image, by torch's counter."""
    from torch.utils.flop_counter import FlopCounterMode

    from apudae_engine.backends.step_graph import StepGraph

    graph = StepGraph(dae).cpu().eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        graph(torch.rand(1, *shape))
    return int(counter.get_total_flops())


@functools.cache
def _case_model(model: str | None, channels: int, layers: int, width: int, size: int,
                device: str):
    """(dae, mu, sigma, description); cached so every batch size reuses one compiled engine."""
    from apudae_engine.method.checkpoint import CheckpointError, load_checkpoint
    from apudae_engine.method.models import REDNet

    dae, mu, sigma, source = None, None, None, "random weights"
    if model is not None:
        try:
            ck = load_checkpoint(model, "dae")
            dae, cal = ck.model, ck.calibration or {}
            mu, sigma, source = cal.get("mu"), cal.get("sigma"), f"checkpoint {model}"
        except CheckpointError:
            log.warning("model %s not found; timing a random REDNet of the same size", model)
    if dae is None:
        torch.manual_seed(0)
        dae = REDNet(channels, layers, width).eval()
    dae = dae.to(device)
    for p in dae.parameters():
        p.requires_grad_(False)
    if mu is None or sigma is None:
        # Stand-in calibration that keeps every image's hinge active at every step: the most
        # gradient work, so the ratio against the reference is a lower bound.
        from apudae_engine.method.purification import reconstruction_error

        probe = torch.rand(64, channels, size, size,
                           generator=torch.Generator().manual_seed(3)).to(device)
        with torch.no_grad():
            r = reconstruction_error(dae, probe).double()
        mu, sigma = 0.5 * float(r.min()), float(r.std())
        source += ", stand-in mu = r_min / 2 (every image active), sigma = std of r"
    return dae, float(mu), float(sigma), source


def load_case(case: Case, batch: int, device: torch.device):
    """(dae, mu, sigma, images, description of the data) for a benchmark case."""
    dae, mu, sigma, source = _case_model(case.model, case.channels, case.layers, case.width,
                                         case.size, str(device))
    x, data = None, "uniform random images"
    if case.model == "fmnist":
        try:
            from apudae_engine.images.datasets import load_dataset

            x = load_dataset("fashion-mnist", "test").subset(batch).float_images()
            x = x.repeat((batch + len(x) - 1) // len(x), 1, 1, 1)[:batch]
            data = "fashion-mnist test images (clean)"
        except Exception as exc:  # no dataset here: random images keep the timing meaningful
            log.info("fashion-mnist not available (%s); timing random images", exc)
    if x is None:
        x = torch.rand(batch, *case.shape, generator=torch.Generator().manual_seed(1))
    if case.perturb:
        signs = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).sign()
        x = (x + case.perturb * signs).clamp(0, 1)
        data += f" + random-sign perturbation of {case.perturb}"
    x = x.to(device)
    return dae, mu, sigma, x, f"{source}; {data}"


def time_purify(purifier, x, ids, device):
    synchronize(device)
    t0 = time.perf_counter()
    res = purifier.purify(x, ids)
    synchronize(device)
    return time.perf_counter() - t0, res


def run_bench(cases: list[str], backends: list[tuple[str, str]], device: torch.device,
              batches: dict[str, tuple[int, ...]] | None = None, repeats: int = 3,
              config: PurifyConfig | None = None) -> dict[str, Any]:
    """Time every (case, batch, backend) and return the JSON record (see module doc)."""
    from apudae_engine.backends.selection import unavailable_reason

    config = (config or PurifyConfig()).with_secret_seed()  # one seed for every backend
    allocator = tune_cpu_allocator() if device.type == "cpu" else None
    record: dict[str, Any] = {
        "kind": "apudae-engine bench", "created": datetime.now(timezone.utc).isoformat(
            timespec="seconds"), "hardware": hardware(device), "device": str(device),
        "allocator": allocator, "config": config.to_dict(), "repeats": repeats,
        "peak": {"float32": measure_peak(device)}, "results": [],
    }
    runnable = [(b, p) for b, p in backends if b != "reference"
                and unavailable_reason(b, device, p) is None]
    for b, p in backends:
        if b != "reference" and (b, p) not in runnable:
            log.warning("skipping %s (%s): %s", b, p, unavailable_reason(b, device, p))
    if any(p == "bf16" for _, p in runnable):
        record["peak"]["bfloat16"] = measure_peak(device, torch.bfloat16)
    grid = batches or DEFAULT_BATCHES["cuda" if device.type == "cuda" else "cpu"]
    for name in cases:
        case = CASES[name]
        for batch in grid.get(name, ()):
            record["results"] += _bench_one(case, batch, runnable, device, repeats, config,
                                            record["peak"])
    record["hardware"]["load_average_end"] = load_average()
    return record


def _bench_one(case, batch, runnable, device, repeats, config, peaks) -> list[dict]:
    from apudae_engine.backends.purifier import Purifier

    dae, mu, sigma, x, data = load_case(case, batch, device)
    ids = torch.arange(batch, device=device)
    flops = step_flops(dae, case.shape) * batch * config.steps
    entries = [(b, p, Purifier(dae, mu, sigma, config, backend=b, precision=p))
               for b, p in [("reference", "fp32"), *runnable]]
    log.info("bench %s batch %d: warming up %s", case.name, batch,
             ", ".join(f"{b}/{p}" for b, p, _ in entries))
    outputs, times = {}, {(b, p): [] for b, p, _ in entries}
    warmup = {}
    for b, p, purifier in entries:  # warm-up: compiling, graph capture, first-batch check
        warmup[(b, p)], outputs[(b, p)] = time_purify(purifier, x, ids, device)
    for _ in range(repeats):
        for b, p, purifier in entries:
            times[(b, p)].append(time_purify(purifier, x, ids, device)[0])
    ref_ips = batch / statistics.median(times[("reference", "fp32")])
    rows = []
    for b, p, purifier in entries:
        ran = purifier.backend_report(device)
        if ran["fallback"]:  # never report the reference's speed under another name
            log.warning("%s (%s) fell back to the reference (%s); row left out", b, p,
                        ran["fallback"])
            continue
        med = statistics.median(times[(b, p)])
        res = outputs[(b, p)]
        peak = peaks["bfloat16" if p == "bf16" and "bfloat16" in peaks else "float32"]
        diff = (res.images - outputs[("reference", "fp32")].images).abs()
        row = {
            "case": case.name, "model": data, "image": list(case.shape), "batch": batch,
            "steps": config.steps, "backend": b, "precision": p,
            "dtype": {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[p],
            "seconds": [round(t, 4) for t in times[(b, p)]], "median_s": round(med, 4),
            "first_call_s": round(warmup[(b, p)], 2),
            "images_per_s": round(batch / med, 2),
            "ratio_vs_reference": round(batch / med / ref_ips, 2),
            "gflops_effective": round(flops / med / 1e9, 1),
            "peak_fraction": round(flops / med / 1e9 / peak["peak_gflops"], 3),
            "active_fraction": round(float(res.active_steps.float().mean()) / config.steps, 3),
            "max_abs_diff_vs_reference": float(diff.max()),
            "mean_abs_diff_vs_reference": float(diff.mean()),
        }
        rows.append(row)
        log.info("%-12s batch %4d %-9s %-4s %9.1f img/s  x%.2f vs reference  %6.1f GFLOP/s",
                 case.name, batch, b, p, row["images_per_s"], row["ratio_vs_reference"],
                 row["gflops_effective"])
    return rows


def default_result_path(record: dict[str, Any], root: str | Path = "benchmarks/results") -> Path:
    hw = record["hardware"]
    what = hw.get("gpu") or f"{hw['cpu']}-{hw['cpu_cores']}c"
    slug = "".join(ch if ch.isalnum() else "-" for ch in what.lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    day = record["created"][:10]
    return Path(root) / f"purify_{day}_{slug}_{record['device'].split(':')[0]}.json"


def write_record(record: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
