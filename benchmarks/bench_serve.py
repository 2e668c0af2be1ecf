"""Throughput and latency of `apudae-engine serve` on this machine, with a small bounded load
generator over loopback.

Starts the server in-process (local Ray, 127.0.0.1), warms it, then runs each scenario for at
most ``--requests`` requests or ``--seconds`` seconds, whichever comes first:

- ``single cN``: one PNG per request (``Content-Type: image/png``), N client threads; with
  N > 1 the server's ``@serve.batch`` joins concurrent images into one purification;
- ``batch32 cN``: 32 base64 PNGs per JSON request, N client threads.

Each row gives requests, images, images/s, request latency p50/p99 (ms), and the in-process
``Purifier.purify`` images/s at the same images per call measured in the same run (the ceiling
without HTTP, JSON and PNG work). The record (JSON and a Markdown table) names the hardware
(``apudae_engine.core.host.describe``) and goes to ``benchmarks/results/``.

    python benchmarks/bench_serve.py --out benchmarks/results/serve_cpu_epyc2
"""

from __future__ import annotations

import os

# As `apudae-engine` does before torch loads: spinning OpenMP threads starve each other on a
# few shared cores. Ray's local workers inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import base64  # noqa: E402
import http.client  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from apudae_engine.backends.purifier import Purifier  # noqa: E402
from apudae_engine.core.host import describe  # noqa: E402
from apudae_engine.method.config import PurifyConfig  # noqa: E402
from apudae_engine.serve.app import ROUTE, start, stop  # noqa: E402
from apudae_engine.serve.engine import ServeSettings  # noqa: E402


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, "L").save(buf, format="PNG")
    return buf.getvalue()


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    """Bundled-sample-like inputs: the package's sample PNGs, cycled."""
    from apudae_engine.images.codec import discover_images, load_image

    samples = Path(__import__("apudae_engine").__file__).parent / "samples"
    arrays = [load_image(p, 1, (28, 28))[0] for p in discover_images(samples)]
    rng = np.random.default_rng(seed)
    return [arrays[i] for i in rng.integers(0, len(arrays), n)]


def _client(port: int, bodies: list[tuple[bytes, str, int]], stop_at: float, budget: list[int],
            lock: threading.Lock, out: list[tuple[float, int]], errors: list[str]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    i = 0
    while time.monotonic() < stop_at:
        with lock:
            if budget[0] <= 0:
                break
            budget[0] -= 1
        body, ctype, n_images = bodies[i % len(bodies)]
        i += 1
        t0 = time.perf_counter()
        conn.request("POST", ROUTE, body=body, headers={"Content-Type": ctype})
        resp = conn.getresponse()
        data = resp.read()
        dt = time.perf_counter() - t0
        if resp.status != 200:
            errors.append(f"{resp.status}: {data[:200]!r}")
            continue
        out.append((dt, n_images))
    conn.close()


def run_scenario(port: int, bodies, concurrency: int, requests: int, seconds: float) -> dict:
    lock, budget, out, errors = threading.Lock(), [requests], [], []
    t0 = time.perf_counter()
    stop_at = time.monotonic() + seconds
    threads = [threading.Thread(target=_client, args=(port, bodies, stop_at, budget, lock, out,
                                                      errors)) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array([d for d, _ in out]) * 1000
    images = sum(n for _, n in out)
    return {"concurrency": concurrency, "requests": len(out), "images": images,
            "errors": len(errors), "seconds": round(wall, 2),
            "images_per_s": round(images / wall, 1),
            "requests_per_s": round(len(out) / wall, 2),
            "latency_ms_p50": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
            "latency_ms_p99": round(float(np.percentile(lat, 99)), 1) if len(lat) else None}


def inprocess_rate(purifier: Purifier, images: list[np.ndarray], per_call: int,
                   seconds: float) -> float:
    x = torch.from_numpy(np.stack(images[:per_call])).float().div(255).unsqueeze(1)
    purifier.purify(x)  # warm
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        purifier.purify(x)
        n += per_call
    return round(n / (time.perf_counter() - t0), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="fmnist")
    ap.add_argument("--requests", type=int, default=200, help="most requests per scenario")
    ap.add_argument("--seconds", type=float, default=40.0, help="most seconds per scenario")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--batch-wait", type=float, default=0.01)
    ap.add_argument("--out", default="benchmarks/results/serve_cpu",
                    help="path stem for .json and .md")
    a = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = ServeSettings(model=a.model, classifier=None, max_batch_size=a.max_batch,
                             batch_wait_s=a.batch_wait, port=port)
    images = _images(256)
    singles = [(_png(im), "image/png", 1) for im in images]
    batches = [(json.dumps({"images": [base64.b64encode(_png(im)).decode()
                                       for im in images[i:i + 32]]}).encode(),
                "application/json", 32) for i in range(0, 256, 32)]
    scenarios = [("single", singles, 1), ("single", singles, 8), ("batch32", batches, 1),
                 ("batch32", batches, 4)]
    t0 = time.perf_counter()
    start(settings)
    startup = time.perf_counter() - t0
    rows = []
    try:
        run_scenario(port, singles, 2, 10, 20)  # warm the connections and the path
        for name, bodies, conc in scenarios:
            n_req = a.requests if name == "single" else max(4, a.requests // 16)
            row = {"scenario": f"{name} c{conc}", **run_scenario(port, bodies, conc, n_req,
                                                                 a.seconds)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        stop()
    purifier = Purifier.from_pretrained(a.model, PurifyConfig(seed=0))
    ceiling = {k: inprocess_rate(purifier, images, k, 10) for k in (1, 8, 32)}
    record = {"benchmark": "serve", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": "python benchmarks/bench_serve.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items()),
              "host": describe("cpu", packages=("ray", "onnxruntime")),
              "settings": {"model": a.model, "backend": settings.backend, "precision": "fp32",
                           "max_batch_size": a.max_batch, "batch_wait_s": a.batch_wait,
                           "image": [1, 28, 28], "steps": PurifyConfig().steps,
                           "classifier": None, "startup_s": round(startup, 1)},
              "inprocess_images_per_s": ceiling, "results": rows}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    h = record["host"]
    lines = [f"# apudae-engine serve on {h['cpu']} ({h['cpu_cores']} cores, torch threads "
             f"{h['torch_threads']}, load {h['load_average']}), {record['date']}", "",
             f"`{record['command']}`", "",
             f"fmnist 1x28x28, adaptive 13 steps, fp32 reference backend, no classifier; "
             f"@serve.batch max {a.max_batch}, wait {a.batch_wait} s; startup "
             f"{record['settings']['startup_s']} s (Ray, Serve, model load and warm-up).", "",
             "| scenario | requests | images/s | p50 ms | p99 ms | errors |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scenario']} | {r['requests']} | {r['images_per_s']} | "
                     f"{r['latency_ms_p50']} | {r['latency_ms_p99']} | {r['errors']} |")
    lines += ["", "In-process `Purifier.purify` in the same run (no HTTP, JSON or PNG): " +
              ", ".join(f"{k} per call {v} img/s" for k, v in ceiling.items()), ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
