"""Test set-up shared by the whole suite.

Triton runs on the CPU only through its interpreter, and the interpreter is chosen when triton
is first imported, so the variable is set here before any test module can import it.
"""

from __future__ import annotations

import os


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # torch missing or broken: the tests will say so themselves
        return False


if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The compiled CPU loop's on-disk package cache (backends.loop_cache) builds each new DAE's
# graphs ahead of time, tens of seconds per tiny test model: the suite compiles in-process
# instead, and tests/engine/backends/test_loop_cache.py turns the cache on for its own tests.
os.environ["APUDAE_LOOP_CACHE"] = "0"

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
