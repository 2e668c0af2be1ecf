"""Adaptive purification (13 steps) per backend against the reference (pytest-benchmark).

    pytest benchmarks/bench_purify.py --benchmark-enable
    APUDAE_BENCH_HEAVY=1 pytest benchmarks/bench_purify.py --benchmark-enable   # + big cases

The default cases are small (the 28x28 fmnist model at batch 64); the heavy ones add batch 512
and the 32x32 REDNet-30, and 224x224 on CUDA. Each result's ``extra_info`` records the
hardware, versions, dtype, batch and image size, images/s, effective GFLOP/s and the ratio to
the reference timed in the same session. ``apudae-engine bench`` writes the same numbers as a
JSON record under benchmarks/results/.
"""

from __future__ import annotations

import functools
import os
import time

import pytest
import torch

from apudae_engine.backends.selection import get_backend, unavailable_reason
from apudae_engine.method.config import PurifyConfig
from apudae_engine.perf.bench import CASES, hardware, load_case, step_flops, tune_cpu_allocator

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HEAVY = os.environ.get("APUDAE_BENCH_HEAVY") == "1"
CONFIG = PurifyConfig(seed=0)
SMALL = [("fmnist", 64)]
BIG = [("fmnist", 512), ("rednet30-32", 64 if DEVICE.type == "cpu" else 512)]
if DEVICE.type == "cuda":
    BIG.append(("rednet30-224", 32))
BACKENDS = ["reference", "compiled:fp32", "compiled:bf16", "tensorrt:fp16"]
ROUNDS = 3
if DEVICE.type == "cpu":
    tune_cpu_allocator()  # for every backend alike; see apudae_engine.perf.bench


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@functools.cache
def _inputs(case: str, batch: int):
    dae, mu, sigma, x, data = load_case(CASES[case], batch, DEVICE)
    return dae, mu, sigma, x, torch.arange(batch, device=DEVICE), data


def _runner(case: str, batch: int, name: str, precision: str):
    dae, mu, sigma, x, ids, _ = _inputs(case, batch)
    backend = get_backend(name, DEVICE, precision)

    def run() -> None:
        backend.purify(dae, x, mu, sigma, CONFIG, ids)
        _sync()

    return run


@functools.cache
def _reference_seconds(case: str, batch: int) -> float:
    run = _runner(case, batch, "reference", "fp32")
    run()
    times = []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


@functools.cache
def _reference_result(case: str, batch: int):
    dae, mu, sigma, x, ids, _ = _inputs(case, batch)
    return get_backend("reference", DEVICE).purify(dae, x, mu, sigma, CONFIG, ids)


def _check_against_reference(case: str, batch: int, name: str, precision: str) -> None:
    """A backend is timed only if its output is the reference's, within verify's tolerances."""
    from apudae_engine.perf.verify import TOLERANCES

    dae, mu, sigma, x, ids, _ = _inputs(case, batch)
    got = get_backend(name, DEVICE, precision).purify(dae, x, mu, sigma, CONFIG, ids).images
    diff = (got - _reference_result(case, batch).images).abs()
    tol = TOLERANCES[precision]
    assert float(diff.mean()) <= tol["mean_abs_diff"], (name, precision, float(diff.mean()))
    if tol["max_abs_diff"] is not None:
        assert float(diff.max()) <= tol["max_abs_diff"], (name, precision, float(diff.max()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("case", "batch"), SMALL + (BIG if HEAVY else []))
def test_purify(benchmark, case: str, batch: int, backend: str) -> None:
    name, _, precision = backend.partition(":")
    precision = precision or "fp32"
    reason = unavailable_reason(name, DEVICE, precision)
    if reason:
        pytest.skip(reason)
    _check_against_reference(case, batch, name, precision)
    run = _runner(case, batch, name, precision)
    benchmark.group = f"purify {case} batch {batch} on {DEVICE.type}"
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    c = CASES[case]
    benchmark.extra_info.update(hardware(DEVICE), backend=name, precision=precision,
                                image=list(c.shape), batch=batch, steps=CONFIG.steps,
                                data=_inputs(case, batch)[5])
    if benchmark.stats is None:  # timing disabled (--benchmark-disable)
        return
    seconds = benchmark.stats.stats.median
    dae = _inputs(case, batch)[0]
    flops = step_flops(dae, c.shape) * batch * CONFIG.steps
    benchmark.extra_info["images_per_s"] = round(batch / seconds, 1)
    benchmark.extra_info["gflops_effective"] = round(flops / seconds / 1e9, 1)
    benchmark.extra_info["ratio_vs_reference"] = round(_reference_seconds(case, batch) / seconds,
                                                       2)
