"""One folder run, written once: the output-folder contract's order around an executor.

``purify`` (:mod:`~apudae_engine.folder.local`) and ``purify-ray``
(:mod:`~apudae_engine.folder.ray_run`) differ only in how they purify the images left to do::

    with folder_run(job) as run:   # check, discover, load, identity, lock, prepare, refused
        ...                        # purify run.todo; run.commit(records) after their files
    # leaving: what ran goes into run.summary, then contract.finish writes summary.json

Every check (folders, backend, model, classifier, loader) runs before anything is written, and
the output folder stays locked until the run has finished or failed.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

from apudae_engine.backends.purifier import Purifier
from apudae_engine.backends.selection import backend_for_job
from apudae_engine.core.errors import UserError
from apudae_engine.core.host import resolve_device
from apudae_engine.folder.batch import ERROR, REJECTED, BatchPurifier
from apudae_engine.folder.contract import (
    MANIFEST,
    InputFile,
    Summary,
    check_folders,
    commit_records,
    discover_inputs,
    finish,
    image_record,
    prepare_output,
    resumed_summary,
    run_identity,
    run_seed,
)
from apudae_engine.folder.guard import output_error, output_lock
from apudae_engine.images.loaders import get_loader
from apudae_engine.method.checkpoint import load_classifier
from apudae_engine.method.config import PurifyConfig


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
    # auto: compiled where it runs, except the reference for fp32 jobs under 1,000 images
    # (backends.selection.backend_for_job)
    backend: str = "auto"
    precision: str = "fp32"
    verify_every: int = 0  # rerun the reference on every N-th batch (0: never)
    overwrite: bool = False
    preview: int = 0
    max_pixels: int = 64_000_000
    workers: int = 2
    loader: str = "auto"  # auto, cpu, dali or nvjpeg; see apudae_engine.images.loaders
    follow_symlinks: bool = False  # read links that point outside the input folder
    reject_flagged: bool = False  # flagged images: a "rejected" record and no output file

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


@dataclass
class FolderRun:
    """What an executor gets from :func:`folder_run`.

    ``job`` holds the run's seed and the model's tuned settings; ``batches`` purifies on
    ``device`` (on Ray's driver it only checks: the actors purify); ``loader`` is the image
    loader (None on Ray); ``todo`` the images left to purify (recorded and refused ones are
    not in it); ``preview`` the rows (input, purified, note) the executor wants in
    preview.png; ``ran`` is set by an executor that learns what ran elsewhere (Ray's actors).
    """

    job: FolderJob
    batches: BatchPurifier
    device: torch.device
    backend: str
    labels: list[str] | None
    loader: Any
    todo: list[InputFile]
    summary: Summary
    manifest: IO[str]
    t_start: float
    preview: list = field(default_factory=list)
    ran: dict | list | None = None
    planned: dict[str, str] = field(default_factory=dict)  # every input's output name

    def __post_init__(self) -> None:
        self._outputs = {**self.planned, **{i.rel: i.output for i in self.todo}}

    @property
    def purifier(self) -> Purifier:
        return self.batches.purifier

    def counts(self) -> dict[str, int]:
        """What the progress bar shows beside its count (rejected only when rejecting)."""
        s = self.summary
        counts = {"ok": s.ok, "failed": s.failed, "flagged": s.flagged}
        return {**counts, "rejected": s.rejected} if self.job.reject_flagged else counts

    def commit(self, records: list[dict]) -> None:
        """Append records whose files are in place and count them (``contract``)."""
        for rec in records:
            # An image with no output now (rejected, or an input that fails since it was
            # replaced) must not keep the file an earlier run wrote for it.
            if rec["status"] in (REJECTED, ERROR) and rec["path"] in self._outputs:
                stale = self.job.output_dir / self._outputs[rec["path"]]
                if stale.is_file():
                    try:
                        stale.unlink()
                    except OSError as exc:
                        raise output_error(exc, stale) from None
        commit_records(self.manifest, self.summary, records)
        self.summary.seconds = time.perf_counter() - self.t_start


@contextmanager
def folder_run(job: FolderJob, on_ray: bool = False,
               refuse: Callable[[InputFile], str | None] | None = None) -> Iterator[FolderRun]:
    """The output-folder contract's run of ``job``, in its order: check the folders, discover
    the inputs (``refuse`` may refuse more of them, with its reason), settle the seed, load
    the purifier and classifier, the run's identity, then under the lock: prepare the output,
    record the refused inputs, yield the :class:`FolderRun` to the executor, and finish
    (summary.json with what ran). ``on_ray``: the model is loaded on the CPU only to check it
    and for the identity, and what ran is what the executor reports in ``run.ran``.
    """
    check_folders(job.input_dir, job.output_dir)
    inputs = discover_inputs(job.input_dir, job.follow_symlinks)
    if not inputs:
        raise UserError(f"no images (png, jpg, jpeg, bmp, tif, tiff, webp) under {job.input_dir}")
    for item in inputs:
        if item.refused is None and refuse is not None:
            item.refused = refuse(item)
    device = torch.device("cpu") if on_ray else resolve_device(job.device)
    # Ray's driver checks no device: the actors' devices decide what can run.
    backend = backend_for_job(job.backend, job.precision, len(inputs),
                              None if on_ray else device)
    config, seed_source = run_seed(job.output_dir, job.config)  # the actors share the seed
    purifier = Purifier.from_pretrained(job.model, config, device, backend=backend,
                                        precision=job.precision)
    job = dataclasses.replace(job, config=purifier.config)  # with the model's tuned settings
    if purifier.input_shape is None:
        raise UserError(f"{job.model}: checkpoint has no input shape")
    clf, labels, clf_sha = load_job_classifier(job, device) or (None, None, None)
    batches = BatchPurifier(purifier, clf, job.reject_flagged)
    identity = run_identity(purifier, job.config.to_dict(), job.precision, clf_sha,
                            job.input_dir, job.reject_flagged)
    loading = nullcontext() if on_ray else get_loader(job.loader, device, job.workers)
    with loading as loader, output_lock(job.output_dir):
        if on_ray:  # what the actors ran is known once they have run; until then, asked
            ran = {"backend": {"requested": job.backend, "backend": backend,
                               "precision": job.precision}, "loader": "ray",
                   "device": job.device, "seed": seed_source}
        else:
            ran = {"backend": purifier.backend_report(device), "loader": loader.name,
                   "device": str(device), "seed": seed_source}
        done = prepare_output(job.output_dir, identity, job.overwrite,
                              {i.rel: i.output for i in inputs},
                              {i.rel: i.source for i in inputs}, ran)
        todo = [i for i in inputs if i.rel not in done]
        summary = resumed_summary(job.output_dir, len(inputs), len(todo), done)
        summary.run = ran
        with _open_manifest(job.output_dir / MANIFEST) as manifest:
            refused = [i for i in todo if i.refused]
            run = FolderRun(job, batches, device, backend, labels, loader,
                            [i for i in todo if not i.refused], summary, manifest,
                            time.perf_counter(), planned={i.rel: i.output for i in inputs})
            if refused:
                run.commit([image_record(i.rel, error=i.refused, source=i.source)
                            for i in refused])
            yield run
        summary.seconds = time.perf_counter() - run.t_start
        # What ran, now that it has: a failed compile or a fallback after the first batch's
        # check shows here.
        if on_ray:
            if run.ran:
                summary.run["backend"] = run.ran
        else:
            summary.run["backend"] = purifier.backend_report(device)
        finish(job.output_dir, summary, run.preview)


def _open_manifest(path: Path) -> IO[str]:
    try:
        return open(path, "a")  # noqa: SIM115 (the caller's with closes it)
    except OSError as exc:
        raise output_error(exc, path) from None
