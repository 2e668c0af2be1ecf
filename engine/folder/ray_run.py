"""``apudae-engine purify-ray``: a folder purified on Ray Data, written like ``purify``'s.

Ray reads the files as bytes (``read_binary_files``); the actors of
:func:`apudae_engine.folder.ray_dataset.purify_dataset` decode them with the ``cpu``
loader's decoder,
purify them and encode the PNGs. The driver writes the files and the manifest the way
:func:`apudae_engine.purify_folder` does: the same folder layout, the same checks, and the same
resume (a record is appended only after its file is in place, so a rerun skips recorded
images; either command resumes the other's folder).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from pathlib import Path

import numpy as np

from apudae_engine.core.errors import UserError
from apudae_engine.core.files import write_atomic
from apudae_engine.core.progress import progress
from apudae_engine.folder.batch import ERROR, OK, ImageOutcome
from apudae_engine.folder.contract import (
    MANIFEST,
    InputFile,
    Summary,
    image_record,
    remove_partial_files,
)
from apudae_engine.folder.guard import ONE_FILE_ERRORS, output_error, stopped_error
from apudae_engine.folder.ray_dataset import import_ray, purify_dataset
from apudae_engine.folder.run import FolderJob, FolderRun, folder_run

log = logging.getLogger(__name__)


def purify_folder_ray(job: FolderJob, address: str | None = None,
                      concurrency: int | tuple[int, int] | None = None, num_gpus: float = 0.0,
                      num_cpus: float | None = None) -> Summary:
    """``purify_folder`` with Ray Data doing the decoding, purifying and PNG encoding.

    Writes PNGs, manifest.jsonl, run.json and summary.json as ``purify_folder`` does (no
    preview), in the same order (:func:`apudae_engine.folder.run.folder_run`); ``job.loader``,
    ``workers``, ``preview`` and ``verify_every`` are not used.
    Args:
        address: a running cluster ("auto", "ray://HOST:PORT"); None starts a local Ray (or
            uses the one this process already started).
        concurrency, num_gpus, num_cpus: the actor pool, as for ``purify_dataset``.
    The input folder must be readable at the same path on every node (a shared file system);
    only the driver writes the output.
    """
    with folder_run(job, on_ray=True, refuse=_unreadable_by_ray) as run:
        # Decoding, purifying and encoding run in the actors; only the driver's writes are timed.
        run.summary.stage_seconds = {"write": _run(run, address, concurrency, num_gpus,
                                                   num_cpus)}
    return run.summary


def _unreadable_by_ray(item: InputFile) -> str | None:
    try:
        item.rel.encode("utf-8")
    except UnicodeEncodeError:
        # Ray reads paths as UTF-8 text; such a file is recorded, not lost in a traceback.
        return (f"{item.path}: name is not valid UTF-8, which Ray cannot read; rename it or "
                "use `apudae-engine purify`")
    return None


def _run(run: FolderRun, address, concurrency, num_gpus, num_cpus) -> float:
    """Purify ``run.todo`` on Ray and write the results; returns the driver's write seconds."""
    job, root = run.job, run.job.input_dir.resolve()
    if not run.todo:
        return 0.0
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)
    context, ray_log = ray.data.DataContext.get_current(), logging.getLogger("ray.data")
    bars, level = context.enable_progress_bars, ray_log.level
    if not log.isEnabledFor(logging.DEBUG):  # our bar and log lines say the same
        context.enable_progress_bars = False
        ray_log.setLevel(logging.CRITICAL)  # a failure is re-raised below
    log.info("purifying %d images from %s with %s on Ray (%s)", len(run.todo), job.input_dir,
             job.model, ray.get_runtime_context().gcs_address)
    try:
        # Reading bytes is I/O. Were a read to need a CPU, it could wait forever behind
        # actors that hold every CPU (--actors N on N cores). Decoding runs in the actors.
        ds = ray.data.read_binary_files([os.path.join(root, i.rel) for i in run.todo],
                                        include_paths=True, num_cpus=0)
        ds = purify_dataset(ds, job.model, job.config, classifier=job.classifier, root=root,
                            device=job.device, backend=run.backend,
                            precision=job.precision, encode_png=True,
                            max_pixels=job.max_pixels, batch_size=job.batch_size,
                            concurrency=concurrency, num_gpus=num_gpus, num_cpus=num_cpus,
                            reject_flagged=job.reject_flagged)
        return _write_results(ds, run, root)
    except UserError:
        raise
    except Exception as exc:
        user = _user_error(exc)
        if user is None:
            raise
        raise user from None
    finally:
        context.enable_progress_bars = bars
        ray_log.setLevel(level)
        if started:
            ray.shutdown()


def _write_results(ds, run: FolderRun, root: Path) -> float:
    """Write each output batch's PNGs, then append and fsync its records; returns seconds.

    A write that fails for want of space (or any output error but one file's name) stops the
    run: what is recorded stays, this batch's unrecorded files are removed, a rerun resumes.
    """
    job, summary = run.job, run.summary
    by_rel = {i.rel: i for i in run.todo}
    seconds, reports = 0.0, set()
    with progress(total=summary.total, initial=summary.recorded, desc="purify",
                  unit="img") as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            t0 = time.perf_counter()
            records, written = [], []
            try:
                for fields, png in _records(batch, root, job.config.steps, run.labels, by_rel):
                    if png:  # the file is in place before its record
                        path = job.output_dir / fields["output"]
                        try:
                            write_atomic(path, png)
                        except OSError as exc:
                            if exc.errno not in ONE_FILE_ERRORS:
                                raise
                            fields = {"path": fields["path"], "source": fields["source"],
                                      "error": str(output_error(exc, path))}
                        else:
                            written.append(path)
                            fields["nbytes"] = len(png)
                    records.append(image_record(**fields))
                run.commit(records)
            except OSError as exc:
                for path in written:
                    path.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    remove_partial_files(job.output_dir)
                raise stopped_error(exc, job.output_dir, job.output_dir / MANIFEST,
                                    summary.ok + summary.rejected) from None
            seconds += time.perf_counter() - t0
            bar.set_postfix(**run.counts())
            bar.update(len(batch["status"]))
            reports.update(batch["ran"])
    if reports:  # one report, or one per kind of actor (e.g. a fallback on one node)
        found = [json.loads(r) for r in sorted(reports)]
        run.ran = found[0] if len(found) == 1 else found
    return seconds


def _records(batch: dict[str, np.ndarray], root: Path, steps: int, labels: list[str] | None,
             by_rel: dict[str, InputFile]):
    """Fields of each row's manifest record (for ``contract.image_record``) and PNG bytes
    (empty where nothing is written: errors and rejected images)."""
    with_labels = "label_before" in batch
    for i, path in enumerate(batch["path"]):
        path = str(path)
        rel = os.path.relpath(path, root)
        item = by_rel[rel]
        status = str(batch["status"][i])
        if status == ERROR:
            # Name the file as purify does: the --input folder as given, not the resolved one.
            error = str(batch["error"][i]).replace(path, str(item.path), 1)
            yield {"path": rel, "error": error, "source": item.source}, b""
            continue
        outcome = ImageOutcome(status, None, float(batch["r_before"][i]),
                               float(batch["r_after"][i]), int(batch["active_steps"][i]),
                               bool(batch["flagged"][i]),
                               int(batch["label_before"][i]) if with_labels else None,
                               int(batch["label_after"][i]) if with_labels else None)
        fields = dict(path=rel, outcome=outcome, output=item.output, steps=steps,
                      labels=labels, source=item.source)
        yield fields, bytes(batch["png"][i]) if status == OK else b""


_ERROR_LINE = re.compile(r"^(apudae_engine(?:\.\w+)*)\.(\w+): (.+)$", re.MULTILINE)


def _user_error(exc: BaseException) -> UserError | None:
    """The UserError a Ray worker raised, for a one-line message instead of Ray's traceback.

    Ray Data hands the driver a wrapper whose text holds the worker's traceback (the original
    exception object is not kept), so the last ``apudae_engine...Error: message`` line is used.
    """
    import importlib

    for e in (exc, getattr(exc, "cause", None), exc.__cause__):
        if isinstance(e, UserError):
            return e
    for module, name, message in reversed(_ERROR_LINE.findall(str(exc))):
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        if isinstance(cls, type) and issubclass(cls, UserError):
            return cls(message)
    return None
