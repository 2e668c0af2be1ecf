"""Folder purification: discover, decode, purify, write, record; resumable and fault-tolerant.

Layout of an output folder::

    OUT/run.json          settings and model hashes of the run (resume checks them)
    OUT/manifest.jsonl    one JSON record per input image (ok or error), sorted at the end
    OUT/summary.json      counts, throughput and stage times of the last invocation
    OUT/preview.png       optional grid: input | purified | amplified difference
    OUT/<rel path>.png    purified images, same relative paths, lossless PNG

A purified image is written atomically before its manifest record is appended, so after a
kill every recorded image exists and rerunning the same command redoes only the rest. Each
image's noise is keyed by its relative path, so resumed and uninterrupted runs write the same
bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from apudae_engine._version import __version__
from apudae_engine.backends.purifier import Purifier
from apudae_engine.backends.selection import SpotCheck, check_backend
from apudae_engine.core.errors import UserError
from apudae_engine.core.files import write_atomic
from apudae_engine.core.host import resolve_device
from apudae_engine.core.progress import progress
from apudae_engine.images.codec import discover_images, encode_png, to_uint8
from apudae_engine.images.loaders import BatchData, get_loader
from apudae_engine.method.checkpoint import load_classifier
from apudae_engine.method.config import PurifyConfig

log = logging.getLogger(__name__)
MANIFEST, RUN_FILE, SUMMARY, PREVIEW = "manifest.jsonl", "run.json", "summary.json", "preview.png"


@dataclass
class FolderJob:
    """A ``purify`` run over a folder; see ``apudae-engine purify --help`` for each field."""

    input_dir: str | Path
    output_dir: str | Path | None = None
    batch_size: int = 512
    model: str | Path = "fmnist"
    classifier: str | Path | None = None  # None: the bundled model's classifier; "none": skip
    config: PurifyConfig = field(default_factory=PurifyConfig)
    device: str = "auto"
    backend: str = "reference"
    precision: str = "fp32"
    verify_every: int = 0  # rerun the reference on every N-th batch (0: never)
    overwrite: bool = False
    preview: int = 0
    max_pixels: int = 64_000_000
    workers: int = 2
    loader: str = "auto"  # auto, cpu, dali or nvjpeg; see apudae_engine.images.loaders

    def __post_init__(self) -> None:
        self.input_dir = Path(self.input_dir)
        if self.output_dir is None:
            self.output_dir = self.input_dir.with_name(self.input_dir.name + "_purified")
        self.output_dir = Path(self.output_dir)
        if self.batch_size < 1:
            raise UserError(f"--batch must be at least 1, got {self.batch_size}")
        if self.workers < 1:
            raise UserError(f"--workers must be at least 1, got {self.workers}")
        if self.preview < 0:
            raise UserError("--preview must be non-negative")
        if self.verify_every < 0:
            raise UserError(f"--verify-every must be non-negative, got {self.verify_every}")


@dataclass
class Summary:
    total: int = 0
    ok: int = 0
    failed: int = 0
    resumed: int = 0
    flagged: int = 0
    seconds: float = 0.0
    verify: list[dict] = field(default_factory=list)
    # decode and write: busy time of the background loader and writer threads; decode_wait and
    # write_wait: time the purifying thread stood idle waiting for them (the bottleneck shows).
    stage_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("decode", "decode_wait", "purify", "write", "write_wait"), 0.0))

    @property
    def images_per_second(self) -> float:
        """Images handled by this invocation (resumed ones excluded) per second."""
        done = self.ok + self.failed - self.resumed
        return done / self.seconds if self.seconds > 0 else 0.0


def path_identity(rel: str) -> int:
    """A 32-bit identity for an image from its relative path (keys its noise)."""
    return int.from_bytes(hashlib.sha256(rel.encode()).digest()[:4], "little")


def output_name(rel: Path) -> Path:
    return rel.with_suffix(".png")


def _check_folders(job: FolderJob) -> None:
    inp, out = job.input_dir.resolve(), job.output_dir.resolve()
    if not inp.exists():
        raise UserError(f"input folder {job.input_dir} does not exist")
    if not inp.is_dir():
        raise UserError(f"input {job.input_dir} is not a folder")
    if out == inp or inp in out.parents:
        raise UserError(f"output folder {job.output_dir} is inside the input folder "
                        f"{job.input_dir}; choose an output outside it")


def _load_classifier(job: FolderJob, device: torch.device):
    ckpt = load_classifier(job.model, job.classifier, device)
    return None if ckpt is None else (ckpt.model, ckpt.meta.get("labels"), ckpt.weights_sha256)


def _run_identity(job: FolderJob, purifier: Purifier, clf_sha: str | None) -> dict[str, Any]:
    ck = purifier.checkpoint
    return {"engine": __version__, "dae_sha256": ck.weights_sha256 if ck else None,
            "mu": purifier.mu, "sigma": purifier.sigma, "classifier_sha256": clf_sha,
            "config": job.config.to_dict(), "input_shape": list(purifier.input_shape or []),
            "precision": job.precision}


def _prepare_output(job: FolderJob, identity: dict[str, Any]) -> dict[str, dict]:
    """Create or validate the output folder; return manifest records that can be kept."""
    out = job.output_dir
    run_file, manifest = out / RUN_FILE, out / MANIFEST
    if out.exists() and any(out.iterdir()):
        previous = None
        if run_file.is_file():
            try:
                previous = json.loads(run_file.read_text())
            except (OSError, ValueError):
                previous = None
        same = previous is not None and {k: v for k, v in previous.items() if k != "input"} == {
            k: v for k, v in identity.items() if k != "input"}
        if not same and not job.overwrite:
            what = "results of a run with different settings or models" if previous else \
                "files not written by apudae-engine"
            raise UserError(f"output folder {out} already holds {what}; pass --overwrite to "
                            "replace them or choose another --output")
        if not same:
            manifest.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if removed := _remove_stale_parts(out):
        log.info("removed %d partial files left by an interrupted run", removed)
    write_atomic(run_file, (json.dumps(identity, indent=2) + "\n").encode())
    records: dict[str, dict] = {}
    if manifest.is_file():
        _drop_torn_tail(manifest)
        with open(manifest) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    records[rec["path"]] = rec
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut by a kill; the image is simply redone
    return {p: r for p, r in records.items()
            if r.get("status") == "ok" and (out / r["output"]).is_file()}


_PART_FILE = re.compile(r"^\..+\.part\d+$")  # core.files.write_atomic's temporary names


def _remove_stale_parts(out: Path) -> int:
    """Delete temporary files a killed run left behind (their images are simply redone)."""
    stale = [p for p in out.rglob(".*.part*") if _PART_FILE.match(p.name) and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def _drop_torn_tail(manifest: Path) -> None:
    """Cut a last line that a kill left without its newline, so appends start on a fresh line."""
    data = manifest.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(manifest, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _write_png(path: Path, arr: np.ndarray) -> float:
    t0 = time.perf_counter()
    write_atomic(path, encode_png(arr))
    return time.perf_counter() - t0


def _batched(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


# ``auto`` compiles only for jobs at least this large. Compiling costs about 6 s on the CPU even
# with warm caches, and the compiled loop is about 2.5x the reference's ~100 img/s there, so it
# pays from roughly 1,000 images on (benchmarks/results/small_job_compile_cpu.md).
AUTO_MIN_IMAGES = 1000


def _resumed_summary(job: FolderJob, total: int, todo: int, done: dict[str, dict]) -> Summary:
    """The run's Summary before any work: the images recorded by an earlier run count as done."""
    summary = Summary(total=total, resumed=total - todo)
    summary.ok = summary.resumed
    summary.flagged = sum(1 for r in done.values() if r.get("flagged"))
    if summary.resumed:
        log.info("resuming: %d of %d images already done in %s", summary.resumed, total,
                 job.output_dir)
    return summary


def _auto_for_job_size(job: FolderJob, n_images: int) -> str:
    """``job.backend``, except that ``auto`` in fp32 runs the reference on small jobs."""
    if job.backend != "auto" or job.precision != "fp32" or n_images >= AUTO_MIN_IMAGES:
        return job.backend
    log.info("backend auto: %d images are fewer than %d, too few to repay compiling; using "
             "the reference (--backend compiled forces it)", n_images, AUTO_MIN_IMAGES)
    return "reference"


def purify_folder(job: FolderJob) -> Summary:
    """Purify every image under ``job.input_dir`` into ``job.output_dir``; see module doc."""
    _check_folders(job)
    files = list(discover_images(job.input_dir))
    if not files:
        raise UserError(f"no images (png, jpg, jpeg, bmp, tif, tiff, webp) under {job.input_dir}")
    device = resolve_device(job.device)
    check_backend(job.backend, device, job.precision)  # an unusable choice fails before any work
    backend = _auto_for_job_size(job, len(files))
    purifier = Purifier.from_pretrained(job.model, job.config, device, backend=backend,
                                        precision=job.precision)
    spot_check = SpotCheck(every=job.verify_every)
    if purifier.input_shape is None:
        raise UserError(f"{job.model}: checkpoint has no input shape")
    clf, labels, clf_sha = _load_classifier(job, device) or (None, None, None)
    identity = _run_identity(job, purifier, clf_sha)
    identity["input"] = str(job.input_dir.resolve())
    done = _prepare_output(job, identity)

    rels = [f.relative_to(job.input_dir) for f in files]
    todo = [(f, r) for f, r in zip(files, rels) if str(r) not in done]
    summary = _resumed_summary(job, len(files), len(todo), done)
    log.info("purifying %d images from %s with %s (%s, %d steps) on %s", len(todo),
             job.input_dir, job.model, job.config.method, job.config.steps, device)
    preview: list[tuple[np.ndarray, np.ndarray]] = []
    t_start = time.perf_counter()
    bar = progress(total=len(files), initial=summary.resumed, desc="purify", unit="img")
    loader = get_loader(job.loader, device, job.workers)
    shape = purifier.input_shape

    def load(batch: list) -> tuple[BatchData, float]:
        t0 = time.perf_counter()
        return loader.load_batch([f for f, _ in batch], shape, job.max_pixels), \
            time.perf_counter() - t0

    def commit(records: list[dict], writes: list[Future], n: int) -> None:
        # A batch's records go in only after its files are in place (resume relies on it).
        t0 = time.perf_counter()
        summary.stage_seconds["write"] += sum(w.result() for w in writes)
        summary.stage_seconds["write_wait"] += time.perf_counter() - t0
        for rec in records:
            mf.write(json.dumps(rec) + "\n")
        mf.flush()
        os.fsync(mf.fileno())
        bar.update(n)
        summary.seconds = time.perf_counter() - t_start
        bar.set_postfix(ok=summary.ok, failed=summary.failed,
                        ips=f"{summary.images_per_second:.0f}/s")

    with loader, ThreadPoolExecutor(1, thread_name_prefix="prefetch") as prefetch, \
            ThreadPoolExecutor(job.workers, thread_name_prefix="write") as pool, \
            open(job.output_dir / MANIFEST, "a") as mf:
        batches = list(_batched(todo, job.batch_size))
        pending = prefetch.submit(load, batches[0]) if batches else None
        writing = None
        for bi, batch in enumerate(batches):
            t0 = time.perf_counter()
            data, seconds = pending.result()
            summary.stage_seconds["decode_wait"] += time.perf_counter() - t0
            summary.stage_seconds["decode"] += seconds
            if bi + 1 < len(batches):  # decode the next batch while this one is purified
                pending = prefetch.submit(load, batches[bi + 1])
            records, writes = _process_batch(batch, data, purifier, clf, labels, device, job,
                                             pool, summary, preview, spot_check, bi)
            if writing is not None:  # the previous batch was written while this one ran
                commit(*writing)
            writing = (records, writes, len(batch))
        if writing is not None:
            commit(*writing)
    bar.close()
    summary.seconds = time.perf_counter() - t_start
    summary.verify = spot_check.records
    _finish(job, summary, preview)
    return summary


@torch.no_grad()
def _process_batch(batch, data: BatchData, purifier: Purifier, clf, labels, device,
                   job: FolderJob, pool: ThreadPoolExecutor, summary: Summary, preview: list,
                   spot_check=None, batch_index: int = 0) -> tuple[list[dict], list[Future]]:
    """Purify one decoded batch and start writing it; returns its records and the writes."""
    records: list[dict] = []
    for i, exc in sorted(data.errors.items()):
        log.error("%s", exc)
        summary.failed += 1
        records.append({"path": str(batch[i][1]), "status": "error", "error": str(exc)})
    good = [batch[i][1] for i in data.ok]
    if not good:
        return records, []
    t0 = time.perf_counter()
    x = data.images
    ids = torch.tensor([path_identity(str(r)) for r in good], dtype=torch.int64, device=device)
    result = purifier.purify(x, ids)
    if spot_check is not None:
        spot_check(batch_index, purifier, x, ids, result)
    out = result.images
    r_after = purifier.reconstruction_error(out)
    pred_before = pred_after = None
    if clf is not None:
        pred_before = clf(x).argmax(1).tolist()
        pred_after = clf(out).argmax(1).tolist()
    if device.type == "cuda":
        torch.cuda.synchronize()
    summary.stage_seconds["purify"] += time.perf_counter() - t0
    arrays = to_uint8(out)
    writes = [pool.submit(_write_png, job.output_dir / output_name(rel), a)
              for rel, a in zip(good, arrays)]
    inputs = to_uint8(x[:max(0, job.preview - len(preview))])  # exact: x holds uint8 / 255
    threshold = purifier.flag_threshold()
    # One device-to-host copy per list: indexing CUDA tensors per image syncs every time.
    r_before, r_after = result.error_before.tolist(), r_after.tolist()
    active_steps = result.active_steps.tolist()
    for i, rel in enumerate(good):
        flagged = threshold is not None and r_before[i] > threshold
        rec = {"path": str(rel), "status": "ok", "output": str(output_name(rel)),
               "r_before": round(r_before[i], 6), "r_after": round(r_after[i], 6),
               "flagged": bool(flagged), "active_steps": active_steps[i],
               "steps": job.config.steps}
        if pred_before is not None:
            rec["label_before"], rec["label_after"] = pred_before[i], pred_after[i]
            if labels:
                rec["class_before"] = labels[pred_before[i]]
                rec["class_after"] = labels[pred_after[i]]
        records.append(rec)
        summary.ok += 1
        summary.flagged += int(flagged)
        if len(preview) < job.preview:
            preview.append((inputs[i], arrays[i]))
    return records, writes


def _finish(job: FolderJob, summary: Summary, preview: list) -> None:
    out = job.output_dir
    records: dict[str, dict] = {}
    with open(out / MANIFEST) as f:
        for line in f:
            try:
                rec = json.loads(line)
                records[rec["path"]] = rec
            except (ValueError, KeyError, TypeError):
                continue
    body = "".join(json.dumps(records[k]) + "\n" for k in sorted(records))
    write_atomic(out / MANIFEST, body.encode())
    doc = {"total": summary.total, "ok": summary.ok, "failed": summary.failed,
           "resumed": summary.resumed, "flagged": summary.flagged,
           "seconds": round(summary.seconds, 3),
           "images_per_second": round(summary.images_per_second, 1),
           "stage_seconds": {k: round(v, 3) for k, v in summary.stage_seconds.items()}}
    if summary.verify:
        doc["verify"] = {"batches": len(summary.verify),
                         "max_abs_diff": max(r["max_abs_diff"] for r in summary.verify),
                         "records": summary.verify}
    write_atomic(out / SUMMARY, (json.dumps(doc, indent=2) + "\n").encode())
    if preview:
        from apudae_engine.images.preview import write_preview

        write_preview(out / PREVIEW, preview)
    log.info("done: %d ok (%d resumed), %d failed, %d flagged as likely adversarial; %.1f img/s; "
             "manifest %s", summary.ok, summary.resumed, summary.failed, summary.flagged,
             summary.images_per_second, out / MANIFEST)
    if summary.failed:
        log.warning("%d images could not be read; see the error records in %s", summary.failed,
                    out / MANIFEST)
