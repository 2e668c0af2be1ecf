"""Ahead-of-time compilation of the step graph for the C++ runner (AOTInductor).

``package_step`` compiles the exported step program (images -> r, dr/dy; dynamic batch) into a
``.pt2`` package that ``torch::inductor::AOTIModelPackageLoader`` loads without Python; the
runner in ``runner/`` runs the adaptive loop around it. Compilation needs a C++ compiler and
takes tens of seconds on the CPU.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from apudae_engine.backends.export import export_program

log = logging.getLogger(__name__)


def package_step(dae: nn.Module, input_shape: tuple[int, int, int], path: str | Path,
                 max_batch: int = 4096) -> Path:
    """Compile the step graph of ``dae`` into an AOTInductor package at ``path`` (.pt2)."""
    from torch._inductor import aoti_compile_and_package

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program = export_program(dae, input_shape, max_batch)
    log.info("compiling the step graph ahead of time (AOTInductor) -> %s", path)
    with torch.no_grad():
        out = aoti_compile_and_package(program, package_path=str(path))
    return Path(out)
