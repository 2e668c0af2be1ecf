"""The gradient through the unrolled adaptive loop: autograd's double backward against the
JVP/VJP Hessian-vector products (``apudae_engine.method.fast_gradient``), same run.

    python benchmarks/bench_aware_gradient.py --images 32 --repeats 5 --threads 1 \\
        --out benchmarks/results/aware_gradient_cpu.json

Times one full EOT draw (classifier o adaptive purification, cross-entropy, gradient with
respect to the input) on the bundled Fashion-MNIST models and the first test images; the two
paths alternate after a warm-up so that a contended machine slows both alike. Records
images/s, the ratio, the largest relative difference between the two gradients (float32), and
the host (``core.host.describe``) with its load average.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from apudae_engine.backends.purifier import Purifier
from apudae_engine.core.host import describe
from apudae_engine.evaluation.attacks.aware import eot_gradient
from apudae_engine.images.datasets import load_dataset
from apudae_engine.method.checkpoint import load_classifier
from apudae_engine.method.config import PurifyConfig

PATHS = ("autograd", "hvp")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the record here (JSON, and .md beside)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    purifier = Purifier.from_pretrained(
        "fmnist", PurifyConfig(seed=0, defaults="method"))  # the records' seed and settings
    classifier = load_classifier("fmnist").model
    data = load_dataset("fashion-mnist", "test", None, (1, 28, 28)).subset(a.images)
    x, y = data.images.float() / 255, data.labels

    def run(path: str) -> torch.Tensor:
        return eot_gradient("full", classifier, purifier, x, y, [0], "ce", gradient=path)

    grads = {path: run(path) for path in PATHS}  # warm-up, and the gradients to compare
    ref = grads["autograd"]
    rel = ((grads["hvp"] - ref).norm() / ref.norm()).item()
    seconds: dict[str, list[float]] = {path: [] for path in PATHS}
    cpu: dict[str, list[float]] = {path: [] for path in PATHS}
    for _ in range(a.repeats):
        for path in PATHS:
            t0, c0 = time.perf_counter(), time.process_time()
            run(path)
            seconds[path].append(time.perf_counter() - t0)
            cpu[path].append(time.process_time() - c0)
    med = {path: statistics.median(v) for path, v in seconds.items()}
    cpu_med = {path: statistics.median(v) for path, v in cpu.items()}
    record = {
        "what": "input gradient of CE(classifier(adaptive_purify(x))) through the unrolled "
                "13-step loop, one noise draw; fmnist DAE and classifier, float32",
        "images": a.images, "repeats": a.repeats, "threads": a.threads,
        "seconds_median": med, "seconds": seconds,
        "images_per_second": {path: round(a.images / s, 2) for path, s in med.items()},
        "speedup_hvp_over_autograd": round(med["autograd"] / med["hvp"], 3),
        # CPU time of this process: what a shared machine's load does not inflate.
        "cpu_seconds_median": cpu_med, "cpu_seconds": cpu,
        "cpu_speedup_hvp_over_autograd": round(cpu_med["autograd"] / cpu_med["hvp"], 3),
        "relative_l2_difference": rel,
        "command": "python benchmarks/bench_aware_gradient.py "
                   f"--images {a.images} --repeats {a.repeats} --threads {a.threads}",
        "hardware": describe(torch.device("cpu")),
    }
    print(json.dumps({k: record[k] for k in ("images_per_second", "speedup_hvp_over_autograd",
                                             "cpu_speedup_hvp_over_autograd",
                                             "relative_l2_difference")}))
    if a.out:
        out = Path(a.out)
        out.write_text(json.dumps(record, indent=1) + "\n")
        hw = record["hardware"]
        out.with_suffix(".md").write_text(
            f"# Gradient through the adaptive loop: double backward vs JVP/VJP\n\n"
            f"`{record['command']}` on {hw['cpu']} ({hw['cpu_cores']} cores, {a.threads} "
            f"torch thread(s), load average {hw['load_average']} at the end), torch "
            f"{hw['torch']}.\n\n"
            f"| path | images/s | median wall s per batch of {a.images} | median CPU s |\n"
            "|---|---|---|---|\n"
            + "".join(f"| {path} | {record['images_per_second'][path]} | {med[path]:.3f} | "
                      f"{cpu_med[path]:.3f} |\n" for path in PATHS)
            + f"\nSpeedup of hvp over autograd: **{record['cpu_speedup_hvp_over_autograd']}x** "
              f"in CPU time ({record['speedup_hvp_over_autograd']}x in wall time on the "
              f"shared machine); relative L2 difference of the gradients (float32): "
              f"{rel:.2e}.\n")


if __name__ == "__main__":
    main()
