"""The machine: device choice, and what a measurement ran on (CPU, GPU, versions)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

from apudae_engine._version import __version__
from apudae_engine.core.errors import UserError
from apudae_engine.core.numerics import conv_fp32_precision


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


def load_average() -> list[float]:
    """The 1/5/15-minute load: how contended a timing on a shared machine was."""
    return [round(v, 2) for v in os.getloadavg()]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/None -> cuda when available, else cpu; explicit cuda without a GPU is an error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device} requested but PyTorch sees no CUDA device here; "
                        "use --device cpu or install a CUDA build of torch")
    return dev


def synchronize(device: torch.device | str) -> None:
    """Wait for queued CUDA work on ``device`` (a no-op on the CPU): call inside timed regions."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def describe(device: torch.device | str = "cpu", packages: tuple[str, ...] = ()) -> dict[str, Any]:
    """The record stored beside every measurement: CPU, cores, threads, load, versions, GPU.

    ``packages`` are optional modules whose versions are added (None when not installed).
    """
    import importlib
    import platform

    info: dict[str, Any] = {
        "device": str(device), "cpu": cpu_model(), "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "engine": __version__,
        # Runs share machines: the load says how contended a timing was.
        "load_average": load_average(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        **gpu_info(device),
    }
    for name in packages:
        try:
            info[name.split(".")[-1]] = getattr(importlib.import_module(name), "__version__", "?")
        except ImportError:
            info[name.split(".")[-1]] = None
    return info
