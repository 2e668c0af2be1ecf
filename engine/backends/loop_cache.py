"""The compiled CPU loop's graphs as AOTInductor packages kept on disk between processes.

``torch.compile`` spends about six seconds of every new process on importing its compiler,
tracing the three graphs of the compiled CPU loop (residual, gradient, update) and loading
their kernels, even when Inductor's caches are warm: a third of a 2,000-image ``purify`` job on
two cores. The same graphs exported (``torch.export``, the batch dimension dynamic) and compiled
ahead of time (AOTInductor) load in about a second. So the first process on a machine builds
them once, as ``torch.compile`` would compile them cold, and every later one loads them.

A package is found by a key over everything that changes it: the graph's name, the folded
weights, the input's (C, H, W), the update's constants, the source of the modules that define
the graphs, torch's version and the CPU's capability (AVX-512, AVX2, ...). Packages are written
to a temporary name and renamed, so concurrent processes and interrupted builds never leave a
partial one under a key; a package that fails to load is rebuilt once.

Where: ``$APUDAE_CACHE_DIR/cpu-loop`` (default ``~/.cache/apudae-engine/cpu-loop``).
``APUDAE_LOOP_CACHE=0`` turns the cache off (the loop is then ``torch.compile``d in each
process, as before). Any failure to build or load falls back to ``torch.compile`` with one
warning, so the cache can only cost time, never results.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

FORMAT = 2  # bump when the graphs' signatures change
MAX_BATCH = 1 << 20  # the dynamic batch dimension's upper bound


def cache_dir() -> Path:
    """Where packages live: ``$APUDAE_CACHE_DIR/cpu-loop`` or ``~/.cache/apudae-engine/...``."""
    root = os.environ.get("APUDAE_CACHE_DIR") or Path.home() / ".cache" / "apudae-engine"
    return Path(root) / "cpu-loop"


def enabled() -> bool:
    """Whether the cache is on (``APUDAE_LOOP_CACHE`` is not ``0``)."""
    return os.environ.get("APUDAE_LOOP_CACHE", "1") != "0"


# The modules whose source defines the graphs (found, not imported: compiled imports this one).
SOURCES = ("apudae_engine.backends.compiled", "apudae_engine.backends.step_graph",
           "apudae_kernels.reference")


def _sources_digest() -> str:
    """The source files that define the graphs: a change to any of them is a new key."""
    import importlib.util

    h = hashlib.sha256()
    for name in SOURCES:
        h.update(Path(importlib.util.find_spec(name).origin).read_bytes())
    return h.hexdigest()


def _weights_digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def key(name: str, module: nn.Module, example: tuple, extra: dict | None = None) -> str:
    """The cache key of graph ``name`` of ``module`` for inputs shaped like ``example``."""
    shapes = [list(t.shape[1:]) if isinstance(t, torch.Tensor) else
              [list(u.shape[1:]) for u in t] for t in example]
    doc = {"format": FORMAT, "name": name, "weights": _weights_digest(module),
           "shapes": shapes, "extra": extra or {}, "sources": _sources_digest(),
           "torch": torch.__version__,
           "cpu": torch.backends.cpu.get_cpu_capability()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _build(module: nn.Module, example: tuple, dynamic_shapes, path: Path) -> None:
    from torch._inductor import aoti_compile_and_package

    with torch.no_grad():
        program = torch.export.export(module, example, dynamic_shapes=dynamic_shapes)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.pt2")  # aoti wants .pt2
        try:
            aoti_compile_and_package(program, package_path=str(tmp))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def load_or_build(name: str, module: nn.Module, example: tuple, dynamic_shapes,
                  extra: dict | None = None) -> Callable | None:
    """The AOTInductor package of ``module`` (exported on ``example``), loaded from the cache
    or built into it first; None (after one warning) when it cannot be built or loaded, so the
    caller compiles instead."""
    if not enabled():
        return None
    try:
        from torch._inductor import aoti_load_package

        path = cache_dir() / f"{name}-{key(name, module, example, extra)[:32]}.pt2"
        for attempt in (0, 1):
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                log.info("building the %s graph once for this machine (AOTInductor; later "
                         "runs load it from %s)", name, path.parent)
                _build(module, example, dynamic_shapes, path)
            try:
                return aoti_load_package(str(path))
            except Exception:  # a damaged package: rebuild it once
                if attempt:
                    raise
                path.unlink(missing_ok=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        log.warning("could not use the compiled-loop cache (%s); compiling in this process "
                    "(APUDAE_LOOP_CACHE=0 skips the cache)", first)
    return None


def batch_dims(example: tuple, batch: torch.export.Dim | None = None) -> tuple:
    """``dynamic_shapes`` for ``example``: dim 0 of every tensor (in nested lists too) is the
    one dynamic ``batch``; 0-d tensors are static."""
    batch = batch or torch.export.Dim("batch", min=2, max=MAX_BATCH)

    def mark(t):
        if isinstance(t, (list, tuple)):
            return [mark(u) for u in t]
        return {0: batch} if t.dim() else None

    return tuple(mark(t) for t in example)
