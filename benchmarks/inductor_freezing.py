"""Does Inductor's weight freezing speed up the compiled CPU loop? (fmnist, batch 512)

    FREEZE=0 python benchmarks/inductor_freezing.py; FREEZE=1 python benchmarks/inductor_freezing.py

Builds the compiled CPU engine with ``torch._inductor.config.freezing`` off or on, times the
first call (compilation included) and the median of three more. Run each setting in its own
process: the setting is global and read when a graph compiles.
"""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch._inductor.config as inductor_config

from apudae_engine.backends.compiled import CompiledCPU
from apudae_engine.method.config import PurifyConfig
from apudae_engine.perf.bench import CASES, load_case


def main() -> None:
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    freeze = os.environ.get("FREEZE") == "1"
    inductor_config.freezing = freeze
    dae, mu, sigma, x, _ = load_case(CASES["fmnist"], 512, torch.device("cpu"))
    engine, config, ids = CompiledCPU(dae, torch.float32), PurifyConfig(seed=0), torch.arange(512)
    t0 = time.perf_counter()
    engine.purify(x, ids, mu, sigma, config)
    first = time.perf_counter() - t0
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        engine.purify(x, ids, mu, sigma, config)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(f"freezing {'on ' if freeze else 'off'}: first call {first:.1f} s, then median "
          f"{med:.3f} s = {512 / med:.1f} img/s ({torch.get_num_threads()} thread)")


if __name__ == "__main__":
    main()
