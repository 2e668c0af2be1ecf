"""The fused Triton adaptive update against the PyTorch reference, on CUDA.

Run on a GPU machine (the project's pytest options disable timing unless asked):

    pytest benchmarks/bench_adaptive_update.py --benchmark-enable

Each result's ``extra_info`` records the GPU, versions, dtype, batch size and image size, the
achieved bandwidth and images/s, and for the Triton rows the speedup over the reference timed
in the same run. Bandwidth counts the bytes the update must move at least (read x, delta,
grad_r, exp_avg, exp_avg_sq; write x, delta, exp_avg, exp_avg_sq; plus r and the ids), the
same count for every implementation, so it compares them on one scale ("effective" GB/s).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import pytest
import torch

from apudae_kernels.reference import adaptive_update_ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA device: the Triton kernel is benchmarked on GPUs only",
    ),
]

DEVICE = "cuda"
# (batch size, values per image): CIFAR-10 at the authors' batch, and an ImageNet-sized image.
CASES = {"cifar10": (256, 3 * 32 * 32), "imagenet": (32, 3 * 224 * 224)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HYPER = {
    "seed": 0, "step": 5, "mu": 2.856, "sigma": 0.923, "eps_n": 0.7 / 255, "max_scale": 4.0,
    "lr": 2 / 255, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "noise": True,
}  # fmt: skip
WARMUP, ROUNDS, ITERATIONS = 5, 30, 10
# As in tests/kernels/test_adaptive_update.py: low precision against the float32 reference.
TOLERANCES = {
    torch.float32: {"rtol": 1e-6, "atol": 1e-6},
    torch.bfloat16: {"rtol": 2**-7, "atol": 1e-30},
}


def _inputs(n: int, d: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """x, delta, grad_r, exp_avg, exp_avg_sq (N, D) in ``dtype``, then r and image ids (N,)."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    big = [torch.rand(n, d, generator=g, device=DEVICE) * s for s in (1.0, 0.01, 0.1, 0.01, 1e-4)]
    r = 2.856 + 0.923 * torch.randn(n, generator=g, device=DEVICE)  # some images active
    return [t.to(dtype) for t in big] + [r, torch.arange(n, device=DEVICE)]


def _bytes_moved(n: int, d: int, dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 9 * n * d * itemsize + n * (4 + 8)


def _synchronized(fn: Callable[[], object]) -> Callable[[], None]:
    """Wait for the GPU inside the timed call, so the time is the kernel's, not the launch's."""

    def run() -> None:
        fn()
        torch.cuda.synchronize()

    return run


@functools.cache
def _reference_seconds(case: str, dtype_name: str) -> float:
    """Mean seconds per reference call, timed like the benchmarks (for the speedup column)."""
    n, d = CASES[case]
    inputs = _inputs(n, d, DTYPES[dtype_name])
    run = _synchronized(lambda: adaptive_update_ref(*inputs, **HYPER))
    for _ in range(WARMUP):
        run()
    start = time.perf_counter()
    for _ in range(ROUNDS * ITERATIONS):
        run()
    return (time.perf_counter() - start) / (ROUNDS * ITERATIONS)


def _environment() -> dict[str, str]:
    import triton

    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "triton": triton.__version__,
    }


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", ["reference", "triton", "triton-inplace"])
def test_adaptive_update(benchmark, impl: str, case: str, dtype_name: str) -> None:
    pytest.importorskip("triton", reason="install the 'triton' extra to benchmark the kernel")
    from apudae_kernels.adaptive_update import adaptive_update_triton

    n, d = CASES[case]
    dtype = DTYPES[dtype_name]
    inputs = _inputs(n, d, dtype)
    if impl == "reference":
        fn = functools.partial(adaptive_update_ref, *inputs, **HYPER)
    else:
        # Check the kernel once before timing it: a fast wrong kernel is not a result.
        got = adaptive_update_triton(*inputs, **HYPER)
        upcast = [t.float() if t.is_floating_point() else t for t in inputs]
        want = adaptive_update_ref(*upcast, **HYPER)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b.to(dtype), **TOLERANCES[dtype])
        # "triton-inplace" is how the engine's hot loop calls it; the state drifts, harmlessly.
        inplace = impl == "triton-inplace"
        fn = functools.partial(adaptive_update_triton, *inputs, **HYPER, inplace=inplace)

    benchmark.group = f"adaptive_update {case} {dtype_name}"
    benchmark.pedantic(
        _synchronized(fn), rounds=ROUNDS, iterations=ITERATIONS, warmup_rounds=WARMUP
    )
    benchmark.extra_info.update(
        _environment(), impl=impl, dtype=dtype_name, batch_size=n, values_per_image=d
    )
    if benchmark.stats is None:  # timing disabled (--benchmark-disable): nothing to report
        return
    seconds = benchmark.stats.stats.mean
    benchmark.extra_info["gb_per_s"] = round(_bytes_moved(n, d, dtype) / seconds / 1e9, 1)
    benchmark.extra_info["images_per_s"] = round(n / seconds)
    if impl != "reference":
        speedup = _reference_seconds(case, dtype_name) / seconds
        benchmark.extra_info["speedup_vs_reference"] = round(speedup, 2)
