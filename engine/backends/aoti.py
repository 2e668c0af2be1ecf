"""Ahead-of-time compilation for the C++ runner (AOTInductor).

``package_whole`` compiles the exported whole purification (``export --whole``:
images, image ids, seed -> purified images and per-image report; dynamic batch) into a ``.pt2``
package that ``torch::inductor::AOTIModelPackageLoader`` loads without Python; the runner in
``runner/`` only decodes images, calls it and writes the results. Compilation needs a C++
compiler and takes several minutes (the unrolled loop) on the CPU.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def package_program(program: torch.export.ExportedProgram, path: str | Path) -> Path:
    """Compile an exported program into an AOTInductor package at ``path`` (.pt2)."""
    from torch._inductor import aoti_compile_and_package

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("compiling ahead of time (AOTInductor) -> %s", path)
    with torch.no_grad():
        out = aoti_compile_and_package(program, package_path=str(path))
    return Path(out)


def package_whole(sidecar: str | Path) -> Path:
    """Compile the whole-purification program that ``export_whole`` wrote (``<stem>.json``
    names it) into ``<stem>.aoti.pt2``, and record that file in the sidecar."""
    sidecar = Path(sidecar)
    doc = json.loads(sidecar.read_text())
    program = torch.export.load(str(sidecar.parent / doc["files"]["pt2"]))
    path = package_program(program, sidecar.with_suffix(".aoti.pt2"))
    doc["files"]["aoti"] = path.name
    sidecar.write_text(json.dumps(doc, indent=2) + "\n")
    return path
