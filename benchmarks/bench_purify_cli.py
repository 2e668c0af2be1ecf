"""Whole processes, start-up, compiling and I/O included: ``apudae-engine purify --input DIR
--batch 512`` (no other flag) against the script a user would write instead
(``user_purify_script.py``: Pillow, the authors' ``torch.optim.Adam`` loop, batch 16, PNG
writes), on the same folder of Fashion-MNIST test images as PNG, interleaved, in one run.

    python benchmarks/bench_purify_cli.py --counts 2000 10000 --repeat 2 \\
        --json benchmarks/results/purify_cli_vs_script.json

Each command runs ``--repeat`` times per image count, alternating with the other, into a fresh
output folder; the median wall time counts. The ratio is the user script's time over
``purify``'s. The record names the CPU, its core count, torch, and the load average.

The input folders are flushed to disk (``os.sync``) and each command runs once untimed before
the timed runs: a first run that writes while the kernel still writes back thousands of fresh
input files measured 6x slower than the next one. ``purify`` runs with an empty compiled-loop
cache (``APUDAE_CACHE_DIR`` in a temporary folder) in that first run, which builds it, as a
machine's first run does; its time is recorded as ``purify_first_run_s``. The timed runs find
the cache built (and Inductor's own caches as they are on the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CLI = Path(sys.executable).with_name("apudae-engine")


def make_folder(folder: Path, count: int) -> Path:
    """The first ``count`` Fashion-MNIST test images as PNG files ``000000.png`` ..."""
    from PIL import Image

    from apudae_engine.images.datasets import load_dataset

    folder.mkdir(parents=True, exist_ok=True)
    images = load_dataset("fashion-mnist", "test").images[:count, 0].numpy()
    for i, a in enumerate(images):
        Image.fromarray(a.astype(np.uint8)).save(folder / f"{i:06d}.png")
    return folder


def commands(src: Path, out: Path) -> dict[str, list[str]]:
    return {
        "user_script": [sys.executable, str(HERE / "user_purify_script.py"), str(src), str(out)],
        "purify": [str(CLI), "purify", "--input", str(src), "--output", str(out), "--batch",
                   "512"],
    }


def timed(cmd: list[str], out: Path, env: dict | None = None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{cmd[:3]} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    rec = {"wall_s": wall, "load_avg_1m": os.getloadavg()[0]}
    summary = out / "summary.json"
    if summary.exists():
        doc = json.loads(summary.read_text())
        rec["backend"] = (doc.get("runs") or [{}])[-1].get("backend")
        rec["ok"] = doc.get("ok")
    else:
        rec["ok"] = len(list(out.glob("*.png")))
    return rec


def machine() -> dict:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    return {"cpu": cpu, "cores": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags,
            "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d")}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--counts", type=int, nargs="+", default=[2000, 10000])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each command first")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    doc = {"machine": machine(), "results": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for count in a.counts:
            src = make_folder(tmp / f"in{count}", count)
            os.sync()
            env = {**os.environ, "APUDAE_CACHE_DIR": str(tmp / f"cache{count}")}
            first = None
            for _ in range(a.warmup):
                for name, cmd in commands(src, tmp / "out").items():
                    rec = timed(cmd, tmp / "out", env)
                    if name == "purify" and first is None:
                        first = rec["wall_s"]
                        print(f"{count} images  purify (first run, builds the loop cache) "
                              f"{first:.2f} s", flush=True)
            runs: dict[str, list[dict]] = {}
            for _ in range(a.repeat):
                for name, cmd in commands(src, tmp / "out").items():
                    rec = timed(cmd, tmp / "out", env)
                    runs.setdefault(name, []).append(rec)
                    print(f"{count} images  {name:12s} {rec['wall_s']:7.2f} s  "
                          f"load {rec['load_avg_1m']:.1f}", flush=True)
            med = {k: statistics.median(r["wall_s"] for r in v) for k, v in runs.items()}
            row = {"images": count, "runs": runs, "purify_first_run_s": first,
                   "median_wall_s": med,
                   "images_per_s": {k: count / v for k, v in med.items()},
                   "ratio_vs_user_script": med["user_script"] / med["purify"]}
            doc["results"].append(row)
            print(f"{count} images: purify {row['images_per_s']['purify']:.1f} img/s, user "
                  f"script {row['images_per_s']['user_script']:.1f} img/s, ratio "
                  f"{row['ratio_vs_user_script']:.2f}x", flush=True)
    if a.json:
        a.json.write_text(json.dumps(doc, indent=1) + "\n")
    return doc


if __name__ == "__main__":
    main()
