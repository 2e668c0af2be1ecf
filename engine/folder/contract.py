"""The output-folder contract shared by ``purify`` and ``purify-ray``: names, records, resume.

Layout of an output folder::

    OUT/run.json          settings and model hashes of the run (resume checks them)
    OUT/manifest.jsonl    one JSON record per input image (ok or error), sorted at the end
    OUT/summary.json      counts, throughput and stage times of the last invocation
    OUT/preview.png       optional grid: input | purified | amplified difference
    OUT/<rel path>.png    purified images, same relative paths, lossless PNG

A purified image is written atomically before its manifest record is appended, so after a
kill every recorded image exists and rerunning the same command redoes only the rest. Each
image's noise is keyed by its relative path (:func:`path_identity`), so resumed and
uninterrupted runs write the same bytes. Either command resumes the other's folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from apudae_engine._version import __version__
from apudae_engine.core.errors import UserError
from apudae_engine.core.files import write_atomic

log = logging.getLogger(__name__)
MANIFEST, RUN_FILE, SUMMARY, PREVIEW = "manifest.jsonl", "run.json", "summary.json", "preview.png"


@dataclass
class Summary:
    """Counts of a run over a folder; ``ok`` and ``flagged`` include resumed images."""

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
    """The output file of the input at relative path ``rel``."""
    return rel.with_suffix(".png")


def check_folders(input_dir: Path, output_dir: Path) -> None:
    """Refuse a missing input, an input that is not a folder, or an output inside the input."""
    inp, out = input_dir.resolve(), output_dir.resolve()
    if not inp.exists():
        raise UserError(f"input folder {input_dir} does not exist")
    if not inp.is_dir():
        raise UserError(f"input {input_dir} is not a folder")
    if out == inp or inp in out.parents:
        raise UserError(f"output folder {output_dir} is inside the input folder "
                        f"{input_dir}; choose an output outside it")


def run_identity(purifier, config: dict[str, Any], precision: str, classifier_sha256: str | None,
                 input_dir: Path) -> dict[str, Any]:
    """What makes two runs the same run: a rerun resumes only when all of this is equal."""
    ck = purifier.checkpoint
    return {"engine": __version__, "dae_sha256": ck.weights_sha256 if ck else None,
            "mu": purifier.mu, "sigma": purifier.sigma, "classifier_sha256": classifier_sha256,
            "config": config, "input_shape": list(purifier.input_shape or []),
            "precision": precision, "input": str(input_dir.resolve())}


def prepare_output(out: Path, identity: dict[str, Any], overwrite: bool) -> dict[str, dict]:
    """Create or validate the output folder; return the manifest records that can be kept."""
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
        if not same and not overwrite:
            what = "results of a run with different settings or models" if previous else \
                "files not written by apudae-engine"
            raise UserError(f"output folder {out} already holds {what}; pass --overwrite to "
                            "replace them or choose another --output")
        if not same:
            manifest.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if removed := remove_partial_files(out):
        log.info("removed %d partial files left by an interrupted run", removed)
    write_atomic(run_file, (json.dumps(identity, indent=2) + "\n").encode())
    records: dict[str, dict] = {}
    if manifest.is_file():
        _drop_torn_tail(manifest)
        records = read_records(manifest)
    return {p: r for p, r in records.items()
            if r.get("status") == "ok" and (out / r["output"]).is_file()}


_PART_FILE = re.compile(r"^\..+\.part\d+$")  # core.files.write_atomic's temporary names


def remove_partial_files(out: Path) -> int:
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


def read_records(manifest: Path) -> dict[str, dict]:
    """The manifest's records by input path (a later record of a path replaces an earlier one)."""
    records: dict[str, dict] = {}
    with open(manifest) as f:
        for line in f:
            try:
                rec = json.loads(line)
                records[rec["path"]] = rec
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a kill; the image is simply redone
    return records


def append_records(manifest: IO[str], records: list[dict]) -> None:
    """Append records and fsync them; call only after their output files are in place."""
    for rec in records:
        manifest.write(json.dumps(rec) + "\n")
    manifest.flush()
    os.fsync(manifest.fileno())


def image_record(path: str, *, error: str | None = None, output: str | None = None,
                 r_before: float = 0.0, r_after: float = 0.0, threshold: float | None = None,
                 active_steps: int = 0, steps: int = 0, label_before: int | None = None,
                 label_after: int | None = None, labels: list[str] | None = None) -> dict:
    """The manifest record of one input: an error record when ``error`` is given, else an ok
    record (``flagged`` when ``r_before > threshold``; class names from ``labels``)."""
    if error is not None:
        return {"path": path, "status": "error", "error": error}
    rec = {"path": path, "status": "ok", "output": output,
           "r_before": round(float(r_before), 6), "r_after": round(float(r_after), 6),
           "flagged": threshold is not None and bool(r_before > threshold),
           "active_steps": int(active_steps), "steps": int(steps)}
    if label_before is not None:
        rec["label_before"], rec["label_after"] = int(label_before), int(label_after)
        if labels:
            rec["class_before"], rec["class_after"] = labels[label_before], labels[label_after]
    return rec


def resumed_summary(out: Path, total: int, todo: int, done: dict[str, dict]) -> Summary:
    """The run's Summary before any work: the images recorded by an earlier run count as done."""
    summary = Summary(total=total, resumed=total - todo)
    summary.ok = summary.resumed
    summary.flagged = sum(1 for r in done.values() if r.get("flagged"))
    if summary.resumed:
        log.info("resuming: %d of %d images already done in %s", summary.resumed, total, out)
    return summary


def finish(out: Path, summary: Summary, preview: list) -> None:
    """Sort the manifest, write summary.json (and the preview), and log the outcome."""
    records = read_records(out / MANIFEST)
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
