"""What a measurement ran on: the CPU model, the GPU and versions, recorded beside results."""

from __future__ import annotations

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
    {} on the CPU or without CUDA. ``conv_fp32`` is how cuDNN runs float32 convolutions:
    "tf32" (PyTorch's default on Ampere and later, so "fp32" timings are TF32 convolutions)
    or "ieee"."""
    if device is not None and torch.device(device).type != "cuda":
        return {}
    if not torch.cuda.is_available():
        return {}
    props = torch.cuda.get_device_properties(device)
    conv = getattr(torch.backends.cudnn, "conv", None)
    precision = getattr(conv, "fp32_precision", None)
    if precision in (None, "none"):
        precision = "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"
    return {"gpu": props.name, "gpu_capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda, "conv_fp32": precision}


def load_average() -> list[float]:
    """The 1/5/15-minute load: how contended a timing on a shared machine was."""
    return [round(v, 2) for v in os.getloadavg()]
