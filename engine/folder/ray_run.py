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

import logging
import os
import re
import time
from pathlib import Path

import numpy as np

from apudae_engine.backends.purifier import Purifier
from apudae_engine.backends.selection import backend_for_job
from apudae_engine.core.errors import UserError
from apudae_engine.core.files import write_atomic
from apudae_engine.core.progress import progress
from apudae_engine.folder.contract import (
    MANIFEST,
    Summary,
    append_records,
    check_folders,
    finish,
    image_record,
    output_name,
    prepare_output,
    resumed_summary,
    run_identity,
)
from apudae_engine.folder.local import FolderJob, load_job_classifier
from apudae_engine.folder.ray_dataset import import_ray, purify_dataset
from apudae_engine.images.codec import discover_images

log = logging.getLogger(__name__)


def purify_folder_ray(job: FolderJob, address: str | None = None,
                      concurrency: int | tuple[int, int] | None = None, num_gpus: float = 0.0,
                      num_cpus: float | None = None) -> Summary:
    """``purify_folder`` with Ray Data doing the decoding, purifying and PNG encoding.

    Writes PNGs, manifest.jsonl, run.json and summary.json as ``purify_folder`` does (no
    preview); ``job.loader``, ``workers``, ``preview`` and ``verify_every`` are not used.
    Args:
        address: a running cluster ("auto", "ray://HOST:PORT"); None starts a local Ray (or
            uses the one this process already started).
        concurrency, num_gpus, num_cpus: the actor pool, as for ``purify_dataset``.
    The input folder must be readable at the same path on every node (a shared file system);
    only the driver writes the output.
    """
    check_folders(job.input_dir, job.output_dir)
    root = job.input_dir.resolve()
    files = list(discover_images(root))
    if not files:
        raise UserError(f"no images (png, jpg, jpeg, bmp, tif, tiff, webp) under {job.input_dir}")
    # Loaded here only for the run identity (hashes, mu, sigma) and to fail before Ray starts.
    purifier = Purifier.from_pretrained(job.model, job.config, "cpu")
    _, labels, clf_sha = load_job_classifier(job, "cpu") or (None, None, None)
    identity = run_identity(purifier, job.config.to_dict(), job.precision, clf_sha, root)
    done = prepare_output(job.output_dir, identity, job.overwrite)
    todo = [f for f in files if str(f.relative_to(root)) not in done]
    summary = resumed_summary(job.output_dir, len(files), len(todo), done)
    threshold = purifier.flag_threshold()
    t_start, write_seconds = time.perf_counter(), 0.0
    if todo:
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
        log.info("purifying %d images from %s with %s on Ray (%s)", len(todo), job.input_dir,
                 job.model, ray.get_runtime_context().gcs_address)
        try:
            # Reading bytes is I/O. Were a read to need a CPU, it could wait forever behind
            # actors that hold every CPU (--actors N on N cores). Decoding runs in the actors.
            ds = ray.data.read_binary_files([str(f) for f in todo], include_paths=True,
                                            num_cpus=0)
            backend = backend_for_job(job.backend, job.precision, len(files))
            ds = purify_dataset(ds, job.model, job.config, classifier=job.classifier, root=root,
                                device=job.device, backend=backend,
                                precision=job.precision, encode_png=True,
                                max_pixels=job.max_pixels, batch_size=job.batch_size,
                                concurrency=concurrency, num_gpus=num_gpus, num_cpus=num_cpus)
            write_seconds = _write_results(ds, job, root, summary, threshold, labels)
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
    summary.seconds = time.perf_counter() - t_start
    # Decoding, purifying and encoding run in the actors; only the driver's writes are timed.
    summary.stage_seconds = {"write": write_seconds}
    finish(job.output_dir, summary, [])
    return summary


def _write_results(ds, job: FolderJob, root: Path, summary: Summary, threshold: float | None,
                   labels: list[str] | None) -> float:
    """Write each output batch's PNGs, then append and fsync its records; returns seconds."""
    seconds = 0.0
    with progress(total=summary.total, initial=summary.resumed, desc="purify",
                  unit="img") as bar, open(job.output_dir / MANIFEST, "a") as mf:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            t0 = time.perf_counter()
            records = []
            for rec, png in _records(batch, root, job.input_dir, job.config.steps, threshold,
                                     labels):
                if rec["status"] == "ok":  # the file is in place before its record
                    write_atomic(job.output_dir / rec["output"], png)
                    summary.ok += 1
                    summary.flagged += int(rec["flagged"])
                else:
                    log.error("%s", rec["error"])
                    summary.failed += 1
                records.append(rec)
            append_records(mf, records)
            seconds += time.perf_counter() - t0
            bar.update(len(batch["status"]))
    return seconds


def _records(batch: dict[str, np.ndarray], root: Path, input_dir: Path, steps: int,
             threshold: float | None, labels: list[str] | None):
    """The manifest records of an output batch (by ``contract.image_record``) and PNG bytes."""
    for i, path in enumerate(batch["path"]):
        path = str(path)
        rel = Path(os.path.relpath(path, root))
        if batch["status"][i] != "ok":
            # Name the file as purify does: the --input folder as given, not the resolved one.
            error = str(batch["error"][i]).replace(path, str(input_dir / rel), 1)
            yield image_record(str(rel), error=error), b""
            continue
        with_labels = "label_before" in batch
        yield image_record(
            str(rel), output=str(output_name(rel)), r_before=batch["r_before"][i],
            r_after=batch["r_after"][i], threshold=threshold,
            active_steps=batch["active_steps"][i], steps=steps,
            label_before=batch["label_before"][i] if with_labels else None,
            label_after=batch["label_after"][i] if with_labels else None,
            labels=labels), bytes(batch["png"][i])


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
