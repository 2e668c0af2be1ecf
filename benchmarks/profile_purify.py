"""Where the time of one adaptive purification goes, per backend (torch.profiler, CPU).

    python benchmarks/profile_purify.py --batch 512 [--backend compiled] [--threads 1]

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

from apudae_engine.backends import get_backend
from apudae_engine.bench import CASES, load_case, tune_cpu_allocator
from apudae_engine.config import PurifyConfig

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--backend", default="reference")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    allocator = tune_cpu_allocator()
    dae, mu, sigma, x, data = load_case(CASES["fmnist"], a.batch, torch.device("cpu"))
    config = PurifyConfig()
    backend = get_backend(a.backend, "cpu", a.precision)
    ids = torch.arange(a.batch)
    backend.purify(dae, x, mu, sigma, config, ids)  # warm-up (compiles)
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
