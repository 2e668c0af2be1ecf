"""What a measurement ran on: the CPU model, the GPU and versions, recorded beside results."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path
from typing import Any

import torch


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """{gpu, gpu_capability, cuda, conv_fp32} of a CUDA ``device`` (the current one for None);
    {} on the CPU or without CUDA. ``conv_fp32`` is how cuDNN runs float32 convolutions outside
    the engine: "tf32" (PyTorch's default on Ampere and later) or "ieee". The engine's own
    fp32 work always runs IEEE (``ieee_fp32_convolutions``)."""
    if device is not None and torch.device(device).type != "cuda":
        return {}
    if not torch.cuda.is_available():
        return {}
    props = torch.cuda.get_device_properties(device)
    return {"gpu": props.name, "gpu_capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda, "conv_fp32": conv_fp32_precision()}


def conv_fp32_precision() -> str:
    """How cuDNN runs float32 convolutions now: "tf32" or "ieee"."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    precision = getattr(conv, "fp32_precision", None)
    if precision in (None, "none"):  # torch before 2.9, or the global default in charge
        with contextlib.suppress(RuntimeError):
            precision = "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"
    return precision or "unknown"


@contextlib.contextmanager
def ieee_fp32_convolutions(device: torch.device | str):
    """Within the block, cuDNN runs float32 convolutions in IEEE float32, not TF32.

    PyTorch's default on Ampere and later GPUs is TF32 (a 10-bit mantissa). Adam's steps have
    the same size whatever the gradient's magnitude, so TF32's rounding grows over the loop:
    simulated on the bundled model (benchmarks/tf32_drift.py), the mean pixel difference to
    float32 was 4.7e-4 and 2.4 % of pixels moved by more than 1/255, beyond the fp32 verify
    tolerances. So "fp32" in this engine means IEEE float32 on every device; bf16/fp16 are the
    reduced precisions. The previous setting is restored on exit.
    """
    if torch.device(device).type != "cuda":
        yield
        return
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9
        old = conv.fp32_precision
        conv.fp32_precision = "ieee"
        try:
            yield
        finally:
            conv.fp32_precision = old
        return
    cudnn = torch.backends.cudnn
    with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark,
                     deterministic=cudnn.deterministic, allow_tf32=False):
        yield


def load_average() -> list[float]:
    """The 1/5/15-minute load: how contended a timing on a shared machine was."""
    return [round(v, 2) for v in os.getloadavg()]
