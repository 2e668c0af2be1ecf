"""Where the time of one adaptive purification goes, per backend (torch.profiler).

    python benchmarks/profile_purify.py --batch 512 [--backend compiled] [--threads 1]
    python benchmarks/profile_purify.py --device cuda --case rednet30-32 --backend compiled

On the CPU, self CPU time is grouped by operator (below). On CUDA, self GPU time is grouped by
kernel (cuDNN forward and data-gradient convolutions, Inductor's Triton kernels, our fused
update, copies) and compared with the wall time: the difference is time the GPU sat idle
(launch overhead, host work, synchronisation).

Operators are grouped into convolution forward, convolution input-gradient (autograd's
``convolution_backward`` in the reference; in the compiled graph every convolution is a
forward one, so its share is reported under "convolution (all)"), BatchNorm, ReLU masks,
the noise hash (int64 ops), the Adam/update arithmetic and the rest. Self CPU time is summed
per group, so nothing is counted twice.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from apudae_engine.backends.selection import get_backend
from apudae_engine.method.config import PurifyConfig
from apudae_engine.perf.bench import CASES, load_case, tune_cpu_allocator

GROUPS = [
    ("conv input-gradient", ("convolution_backward",)),
    ("conv forward", ("mkldnn_convolution", "_convolution", "convolution", "conv2d",
                      "conv_transpose")),
    ("batchnorm", ("batch_norm",)),
    ("relu / masks", ("relu", "threshold", "clamp_min")),
    ("noise hash (int64)", ("bitwise", "shift", "__and__", "__xor__", "__or__")),
]


def group_of(name: str) -> str:
    if "cpp_fused" in name or "CompiledFxGraph" in name:
        return "compiled fused loops (update, noise, relu, residual)"
    for group, keys in GROUPS:
        if any(k in name for k in keys):
            return group
    if any(k in name for k in ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::sqrt",
                               "aten::pow", "aten::lerp", "aten::addcmul", "aten::addcdiv")):
        return "element-wise float (Adam, noise scaling, residual)"
    return "other"


CUDA_GROUPS = [
    ("conv input-gradient (cuDNN dgrad)", ("dgrad",)),
    ("convolution (cuDNN/cutlass)", ("fprop", "conv", "implicit_gemm", "xmma", "cutlass",
                                     "winograd", "gemm")),
    ("fused update (apudae Triton)", ("_adaptive_update_kernel",)),
    ("Inductor Triton kernels", ("triton_",)),
    ("copies / fills", ("Memcpy", "Memset", "copy", "fill")),
]


def cuda_group_of(name: str) -> str:
    return next((g for g, keys in CUDA_GROUPS if any(k in name for k in keys)), "other")


def _profile_cuda(backend, dae, x, mu, sigma, config, ids) -> dict:
    import time

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    backend.purify(dae, x, mu, sigma, config, ids)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        backend.purify(dae, x, mu, sigma, config, ids)
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    kernels: dict[str, float] = defaultdict(float)
    for ev in prof.key_averages():
        t = getattr(ev, "self_device_time_total", None)
        if t is None:
            t = getattr(ev, "self_cuda_time_total", 0.0)
        if t and ev.device_type == torch.autograd.DeviceType.CUDA:
            totals[cuda_group_of(ev.key)] += t / 1e6
            kernels[ev.key] += t / 1e6
    return {"wall_s": wall, "gpu_busy_s": sum(totals.values()), "groups": dict(totals),
            "top_kernels": dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:12])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--backend", default="reference")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--case", default="fmnist", choices=list(CASES))
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    allocator = tune_cpu_allocator() if device.type == "cpu" else None
    dae, mu, sigma, x, data = load_case(CASES[a.case], a.batch, device)
    config = PurifyConfig(seed=0)
    backend = get_backend(a.backend, device, a.precision)
    ids = torch.arange(a.batch, device=device)
    backend.purify(dae, x, mu, sigma, config, ids)  # warm-up (compiles)
    if device.type == "cuda":
        res = _profile_cuda(backend, dae, x, mu, sigma, config, ids)
        print(f"{a.backend} ({a.precision}), {a.case} batch {a.batch} on "
              f"{torch.cuda.get_device_name(device)}; {data}")
        print(f"  wall {res['wall_s'] * 1e3:.1f} ms, GPU busy {res['gpu_busy_s'] * 1e3:.1f} ms "
              f"({100 * res['gpu_busy_s'] / res['wall_s']:.0f} %)")
        for group, sec in sorted(res["groups"].items(), key=lambda kv: -kv[1]):
            print(f"  {group:<40} {sec * 1e3:9.2f} ms  {100 * sec / res['gpu_busy_s']:5.1f} %")
        print("  top kernels:")
        for name, sec in res["top_kernels"].items():
            print(f"    {sec * 1e3:9.2f} ms  {name[:100]}")
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"backend": a.backend, "precision": a.precision, "case": a.case,
                           "batch": a.batch, "gpu": torch.cuda.get_device_name(device), **res},
                          f, indent=2)
        return
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        backend.purify(dae, x, mu, sigma, config, ids)
    totals: dict[str, float] = defaultdict(float)
    for ev in prof.key_averages():
        totals[group_of(ev.key)] += ev.self_cpu_time_total / 1e6
    whole = sum(totals.values())
    print(f"{a.backend} ({a.precision}), batch {a.batch}, {torch.get_num_threads()} threads, "
          f"{data}; allocator: {allocator}")
    for group, sec in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {group:<55} {sec:8.3f} s  {100 * sec / whole:5.1f} %")
    print(f"  {'total (self CPU time)':<55} {whole:8.3f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"backend": a.backend, "precision": a.precision, "batch": a.batch,
                       "threads": torch.get_num_threads(), "seconds": totals}, f, indent=2)


if __name__ == "__main__":
    main()
