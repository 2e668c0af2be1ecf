"""``purify``: discover, decode, purify, write and record a folder; resumable, fault-tolerant.

The output folder follows :mod:`apudae_engine.folder.contract` (layout, records, resume).
Decoding the next batch, purifying this one and writing the previous one overlap.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from apudae_engine.backends.purifier import Purifier
from apudae_engine.backends.selection import backend_for_job
from apudae_engine.backends.spot_check import SpotCheck
from apudae_engine.core.errors import UserError
from apudae_engine.core.files import write_atomic
from apudae_engine.core.host import resolve_device
from apudae_engine.core.progress import progress
from apudae_engine.folder.contract import (
    MANIFEST,
    NOT_FINITE,
    InputFile,
    Summary,
    check_folders,
    commit_records,
    discover_inputs,
    finish,
    image_record,
    path_identity,
    prepare_output,
    remove_partial_files,
    resumed_summary,
    run_identity,
    run_seed,
)
from apudae_engine.folder.guard import ONE_FILE_ERRORS, output_error, output_lock, stopped_error
from apudae_engine.images.codec import encode_png, to_uint8
from apudae_engine.images.loaders import BatchData, get_loader
from apudae_engine.method.checkpoint import load_classifier
from apudae_engine.method.config import PurifyConfig

__all__ = ["FolderJob", "Summary", "path_identity", "purify_folder"]
log = logging.getLogger(__name__)


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
    follow_symlinks: bool = False  # read links that point outside the input folder

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


def load_job_classifier(job: FolderJob, device: torch.device | str):
    """``(model, labels, weights_sha256)`` of the job's classifier, or None without one."""
    ckpt = load_classifier(job.model, job.classifier, device)
    return None if ckpt is None else (ckpt.model, ckpt.meta.get("labels"), ckpt.weights_sha256)


def _write_png(path: Path, arr: np.ndarray) -> tuple[float, int | str]:
    """Encode and write one output; (seconds, bytes written or the error of this file)."""
    t0 = time.perf_counter()
    data = encode_png(arr)
    try:
        write_atomic(path, data)
    except OSError as exc:
        if exc.errno not in ONE_FILE_ERRORS:
            raise
        return time.perf_counter() - t0, str(output_error(exc, path))
    return time.perf_counter() - t0, len(data)


def _batched(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def purify_folder(job: FolderJob) -> Summary:
    """Purify every image under ``job.input_dir`` into ``job.output_dir``.

    The output folder follows :mod:`apudae_engine.folder.contract`. Every check (folders,
    backend, model, classifier, loader) runs before anything is written; the output folder is
    locked for the run. Returns the run's :class:`Summary`.
    Example: ``purify_folder(FolderJob("photos", "clean", batch_size=64))``.
    """
    check_folders(job.input_dir, job.output_dir)
    inputs = discover_inputs(job.input_dir, job.follow_symlinks)
    if not inputs:
        raise UserError(f"no images (png, jpg, jpeg, bmp, tif, tiff, webp) under {job.input_dir}")
    device = resolve_device(job.device)
    backend = backend_for_job(job.backend, job.precision, len(inputs), device)
    config, seed_source = run_seed(job.output_dir, job.config)
    purifier = Purifier.from_pretrained(job.model, config, device, backend=backend,
                                        precision=job.precision)
    job = dataclasses.replace(job, config=purifier.config)  # with the model's tuned settings
    spot_check = SpotCheck(every=job.verify_every)
    if purifier.input_shape is None:
        raise UserError(f"{job.model}: checkpoint has no input shape")
    clf, labels, clf_sha = load_job_classifier(job, device) or (None, None, None)
    identity = run_identity(purifier, job.config.to_dict(), job.precision, clf_sha,
                            job.input_dir)
    with get_loader(job.loader, device, job.workers) as loader, output_lock(job.output_dir):
        ran = {"backend": purifier.backend_report(device), "loader": loader.name,
               "device": str(device), "seed": seed_source}
        done = prepare_output(job.output_dir, identity, job.overwrite,
                              {i.rel: i.output for i in inputs},
                              {i.rel: i.source for i in inputs}, ran)
        todo = [i for i in inputs if i.rel not in done]
        summary = resumed_summary(job.output_dir, len(inputs), len(todo), done)
        summary.run = ran
        _run(job, todo, summary, purifier, clf, labels, device, loader, spot_check)
    return summary


def _run(job: FolderJob, todo: list[InputFile], summary: Summary, purifier: Purifier, clf,
         labels, device: torch.device, loader, spot_check: SpotCheck) -> None:
    log.info("purifying %d images from %s with %s (%s, %d steps) on %s", len(todo),
             job.input_dir, job.model, job.config.method, job.config.steps, device)
    preview: list[tuple[np.ndarray, np.ndarray, str]] = []  # input, purified, path
    notes: dict[str, dict] = {}  # the preview rows' manifest records, annotating the grid
    t_start = time.perf_counter()
    bar = progress(total=summary.total, initial=summary.resumed, desc="purify", unit="img")
    shape = purifier.input_shape
    refused = [i for i in todo if i.refused]
    todo = [i for i in todo if not i.refused]

    def load(batch: list[InputFile]) -> tuple[BatchData, float]:
        t0 = time.perf_counter()
        return loader.load_batch([i.path for i in batch], shape, job.max_pixels), \
            time.perf_counter() - t0

    def commit(pending: list[tuple[dict, Future | None]], n: int) -> None:
        # A batch's records go in only after its files are in place (resume relies on it).
        t0 = time.perf_counter()
        records = []
        for fields, write in pending:
            if write is not None:
                seconds, written = write.result()
                summary.stage_seconds["write"] += seconds
                if isinstance(written, str):  # this file could not be written; the run goes on
                    fields = {"path": fields["path"], "error": written,
                              "source": fields["source"]}
                else:
                    fields["nbytes"] = written
            records.append(image_record(**fields))
            if len(notes) < len(preview) and any(p == fields["path"] for *_, p in preview):
                # Printable: a name that is not UTF-8 shows its bytes as escapes.
                notes[fields["path"]] = {**records[-1], "path": os.fsencode(
                    fields["path"]).decode("utf-8", "backslashreplace")}
        summary.stage_seconds["write_wait"] += time.perf_counter() - t0
        commit_records(mf, summary, records)
        summary.seconds = time.perf_counter() - t_start
        # The counters describe what is committed, the same images the count shows; the bar
        # or log line gives the one rate.
        bar.set_postfix(ok=summary.ok, failed=summary.failed, flagged=summary.flagged)
        bar.update(n)

    writing: list = []
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="prefetch") as prefetch, \
                ThreadPoolExecutor(job.workers, thread_name_prefix="write") as pool, \
                open(job.output_dir / MANIFEST, "a") as mf:
            if refused:
                commit([({"path": i.rel, "error": i.refused, "source": i.source}, None)
                        for i in refused], len(refused))
            batches = list(_batched(todo, job.batch_size))
            pending = prefetch.submit(load, batches[0]) if batches else None
            for bi, batch in enumerate(batches):
                t0 = time.perf_counter()
                data, seconds = pending.result()
                summary.stage_seconds["decode_wait"] += time.perf_counter() - t0
                summary.stage_seconds["decode"] += seconds
                if bi + 1 < len(batches):  # decode the next batch while this one is purified
                    pending = prefetch.submit(load, batches[bi + 1])
                writing.append((_process_batch(batch, data, purifier, clf, labels, device, job,
                                               pool, summary, preview, spot_check, bi),
                                len(batch)))
                if len(writing) > 1:  # the previous batch was written while this one ran
                    commit(*writing[0])
                    writing.pop(0)
            while writing:
                commit(*writing[0])
                writing.pop(0)
    except OSError as exc:  # the output cannot take more: keep what is recorded, stop cleanly
        bar.close()
        raise _stopped(job, exc, writing, summary) from None
    bar.close()
    summary.seconds = time.perf_counter() - t_start
    summary.verify = spot_check.records
    summary.run["backend"] = purifier.backend_report(device)  # a failed compile shows here
    finish(job.output_dir, summary, [(a, b, notes.get(p)) for a, b, p in preview])


def _stopped(job: FolderJob, exc: OSError, writing: list, summary: Summary) -> UserError:
    """Remove this run's unrecorded outputs and partial files; the error to report."""
    for pending, _ in writing:
        for fields, write in pending:
            if write is not None and fields.get("output"):
                (job.output_dir / fields["output"]).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        remove_partial_files(job.output_dir)
    return stopped_error(exc, job.output_dir, job.output_dir / MANIFEST, summary.ok)


@torch.no_grad()
def _process_batch(batch: list[InputFile], data: BatchData, purifier: Purifier, clf, labels,
                   device, job: FolderJob, pool: ThreadPoolExecutor, summary: Summary,
                   preview: list, spot_check=None,
                   batch_index: int = 0) -> list[tuple[dict, Future | None]]:
    """Purify one decoded batch and start writing it; returns each image's record fields (for
    ``contract.image_record``) with its write, None where nothing is written."""
    pending: list[tuple[dict, Future | None]] = []
    for i, exc in sorted(data.errors.items()):
        pending.append(({"path": batch[i].rel, "error": str(exc), "source": batch[i].source},
                        None))
    good = [batch[i] for i in data.ok]
    if not good:
        return pending
    t0 = time.perf_counter()
    x = data.images
    ids = torch.tensor([path_identity(i.rel) for i in good], dtype=torch.int64, device=device)
    result = purifier.purify(x, ids)
    if spot_check is not None:
        spot_check(batch_index, purifier, x, ids, result)
    out = result.images
    r_after = purifier.reconstruction_error(out)
    pred_before = pred_after = None
    if clf is not None:
        pred_before = clf(x).argmax(1).tolist()
        pred_after = clf(out).argmax(1).tolist()
    finite = torch.isfinite(out).flatten(1).all(1).tolist()
    if device.type == "cuda":
        torch.cuda.synchronize()
    summary.stage_seconds["purify"] += time.perf_counter() - t0
    arrays = to_uint8(out)
    inputs = to_uint8(x[:max(0, job.preview - len(preview))])  # exact: x holds uint8 / 255
    threshold = purifier.flag_threshold()
    # One device-to-host copy per list: indexing CUDA tensors per image syncs every time.
    r_before, r_after = result.error_before.tolist(), r_after.tolist()
    active_steps = result.active_steps.tolist()
    for i, item in enumerate(good):
        if not (finite[i] and math.isfinite(r_before[i]) and math.isfinite(r_after[i])):
            # Never an output or an ok record from NaN/Inf (they would quantise to black).
            pending.append(({"path": item.rel, "error": f"{item.path}: {NOT_FINITE}",
                             "source": item.source}, None))
            continue
        fields = dict(path=item.rel, output=item.output, r_before=r_before[i],
                      r_after=r_after[i], threshold=threshold, active_steps=active_steps[i],
                      steps=job.config.steps, source=item.source,
                      label_before=None if clf is None else pred_before[i],
                      label_after=None if clf is None else pred_after[i], labels=labels)
        pending.append((fields, pool.submit(_write_png, job.output_dir / item.output,
                                            arrays[i])))
        if len(preview) < job.preview:
            preview.append((inputs[i], arrays[i], item.rel))
    return pending
