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
    """{gpu, gpu_capability, cuda} of a CUDA ``device`` (the current one for None); {} on the
    CPU or without CUDA."""
    if device is not None and torch.device(device).type != "cuda":
        return {}
    if not torch.cuda.is_available():
        return {}
    props = torch.cuda.get_device_properties(device)
    return {"gpu": props.name, "gpu_capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda}


def load_average() -> list[float]:
    """The 1/5/15-minute load: how contended a timing on a shared machine was."""
    return [round(v, 2) for v in os.getloadavg()]
