"""``purify``: discover, decode, purify, write and record a folder; resumable, fault-tolerant.

The output folder follows :mod:`apudae_engine.folder.contract` (layout, records, resume).
Decoding the next batch, purifying this one and writing the previous one overlap.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from apudae_engine.backends.spot_check import SpotCheck
from apudae_engine.core.files import write_atomic
from apudae_engine.core.progress import progress
from apudae_engine.folder.batch import ERROR, OK
from apudae_engine.folder.contract import (
    MANIFEST,
    InputFile,
    Summary,
    image_record,
    path_identity,
    remove_partial_files,
)
from apudae_engine.folder.guard import ONE_FILE_ERRORS, output_error, stopped_error
from apudae_engine.folder.run import FolderJob, FolderRun, folder_run, load_job_classifier
from apudae_engine.images.codec import encode_png, to_uint8
from apudae_engine.images.loaders import BatchData

__all__ = ["FolderJob", "Summary", "load_job_classifier", "path_identity", "purify_folder"]
log = logging.getLogger(__name__)


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

    The output folder follows :mod:`apudae_engine.folder.contract`, the run's order
    :func:`apudae_engine.folder.run.folder_run`: every check (folders, backend, model,
    classifier, loader) runs before anything is written; the output folder is locked for the
    run. Returns the run's :class:`Summary`.
    Example: ``purify_folder(FolderJob("photos", "clean", batch_size=64))``.
    """
    spot_check = SpotCheck(every=job.verify_every)
    with folder_run(job) as run:
        _run(run, spot_check)
    return run.summary


def _run(run: FolderRun, spot_check: SpotCheck) -> None:
    job, summary, todo = run.job, run.summary, run.todo
    log.info("purifying %d images from %s with %s (%s, %d steps) on %s", len(todo),
             job.input_dir, job.model, job.config.method, job.config.steps, run.device)
    preview: list[tuple[np.ndarray, np.ndarray, str]] = []  # input, purified, path
    notes: dict[str, dict] = {}  # the preview rows' manifest records, annotating the grid
    bar = progress(total=summary.total, initial=summary.recorded, desc="purify", unit="img")
    shape = run.purifier.input_shape

    def load(batch: list[InputFile]) -> tuple[BatchData, float]:
        t0 = time.perf_counter()
        return run.loader.load_batch([i.path for i in batch], shape, job.max_pixels), \
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
        run.commit(records)
        # The counters describe what is committed, the same images the count shows; the bar
        # or log line gives the one rate.
        bar.set_postfix(**run.counts())
        bar.update(n)

    writing: list = []
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="prefetch") as prefetch, \
                ThreadPoolExecutor(job.workers, thread_name_prefix="write") as pool:
            batches = list(_batched(todo, job.batch_size))
            pending = prefetch.submit(load, batches[0]) if batches else None
            for bi, batch in enumerate(batches):
                t0 = time.perf_counter()
                data, seconds = pending.result()
                summary.stage_seconds["decode_wait"] += time.perf_counter() - t0
                summary.stage_seconds["decode"] += seconds
                if bi + 1 < len(batches):  # decode the next batch while this one is purified
                    pending = prefetch.submit(load, batches[bi + 1])
                writing.append((_process_batch(batch, data, run, pool, preview, spot_check, bi),
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
    summary.verify = spot_check.records
    run.preview = [(a, b, notes.get(p)) for a, b, p in preview]


def _stopped(job: FolderJob, exc: OSError, writing: list, summary: Summary):
    """Remove this run's unrecorded outputs and partial files; the error to report."""
    for pending, _ in writing:
        for fields, write in pending:
            if write is not None and fields.get("output"):
                (job.output_dir / fields["output"]).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        remove_partial_files(job.output_dir)
    return stopped_error(exc, job.output_dir, job.output_dir / MANIFEST,
                         summary.ok + summary.rejected)


@torch.no_grad()
def _process_batch(batch: list[InputFile], data: BatchData, run: FolderRun,
                   pool: ThreadPoolExecutor, preview: list, spot_check: SpotCheck,
                   batch_index: int) -> list[tuple[dict, Future | None]]:
    """Purify one decoded batch and start writing it; returns each image's record fields (for
    ``contract.image_record``) with its write, None where nothing is written."""
    job = run.job
    pending: list[tuple[dict, Future | None]] = []
    for i, exc in sorted(data.errors.items()):
        pending.append(({"path": batch[i].rel, "error": str(exc), "source": batch[i].source},
                        None))
    good = [batch[i] for i in data.ok]
    if not good:
        return pending
    t0 = time.perf_counter()
    x = data.images
    ids = torch.tensor([path_identity(i.rel) for i in good], dtype=torch.int64,
                       device=run.device)
    done = run.batches(x, ids, [str(i.path) for i in good])
    spot_check(batch_index, run.purifier, x, ids, done.result)
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    run.summary.stage_seconds["purify"] += time.perf_counter() - t0
    arrays = to_uint8(done.images)
    for i, (item, outcome) in enumerate(zip(good, done.outcomes)):
        if outcome.status == ERROR:  # never an output from NaN/Inf
            pending.append(({"path": item.rel, "error": outcome.error, "source": item.source},
                            None))
            continue
        fields = dict(path=item.rel, outcome=outcome, output=item.output,
                      steps=job.config.steps, labels=run.labels, source=item.source)
        if outcome.status != OK:  # rejected: a record, no file
            pending.append((fields, None))
            continue
        pending.append((fields, pool.submit(_write_png, job.output_dir / item.output,
                                            arrays[i])))
        if len(preview) < job.preview:  # exact: x holds uint8 / 255
            preview.append((to_uint8(x[i:i + 1])[0], arrays[i], item.rel))
    return pending
