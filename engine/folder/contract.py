"""The output-folder contract shared by ``purify`` and ``purify-ray``: names, records, resume.

Layout of an output folder::

    OUT/run.json          what makes the run (settings, model hashes, input folder) and what ran
    OUT/manifest.jsonl    one JSON record per input image (ok, rejected or error), sorted at
                          the end
    OUT/summary.json      totals of the folder and a list ``runs``: each invocation's counts
    OUT/preview.png       optional grid: input | purified | amplified difference
    OUT/.lock             the advisory lock of the run in progress (pid, host, start time)
    OUT/<rel path>.png    purified images, same relative paths, lossless PNG

A purified image is written atomically before its manifest record is appended, so after a
kill every recorded image exists and rerunning the same command redoes only the rest. Each
image's noise is keyed by its relative path (:func:`path_identity`), so resumed and
uninterrupted runs write the same bytes. Either command resumes the other's folder.

A record holds the input's size and mtime (``source``) and the output's size (``bytes``): a
rerun redoes an image whose output went missing or changed size, and refuses (without
``--overwrite``) a folder whose recorded inputs changed. A ``rejected`` record (a flagged image
under ``--reject-flagged``) has no output file and counts as done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from apudae_engine._version import __version__
from apudae_engine.core.errors import UserError
from apudae_engine.core.files import write_atomic
from apudae_engine.folder.guard import LOCK_FILE, output_error
from apudae_engine.method.config import PurifyConfig

if TYPE_CHECKING:
    from apudae_engine.folder.batch import ImageOutcome

log = logging.getLogger(__name__)
MANIFEST, RUN_FILE, SUMMARY, PREVIEW = "manifest.jsonl", "run.json", "summary.json", "preview.png"
_OWN_FILES = {MANIFEST, RUN_FILE, SUMMARY, PREVIEW, LOCK_FILE}


@dataclass
class Summary:
    """Counts of a run over a folder; ``ok``, ``rejected`` and ``flagged`` include resumed
    images (``flagged`` counts the rejected ones too).

    ``run`` says what ran in this invocation (backend, precision, loader); ``finish`` adds it,
    with this invocation's counts, to the ``runs`` list of summary.json.
    """

    total: int = 0
    ok: int = 0
    rejected: int = 0
    failed: int = 0
    resumed: int = 0
    resumed_rejected: int = 0  # of ``resumed``, the rejected ones
    flagged: int = 0
    seconds: float = 0.0
    verify: list[dict] = field(default_factory=list)
    # decode and write: busy time of the background loader and writer threads; decode_wait and
    # write_wait: time the purifying thread stood idle waiting for them (the bottleneck shows).
    stage_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("decode", "decode_wait", "purify", "write", "write_wait"), 0.0))
    run: dict[str, Any] = field(default_factory=dict)

    @property
    def recorded(self) -> int:
        """Images with a record in the manifest (resumed ones included)."""
        return self.ok + self.rejected + self.failed

    @property
    def images_per_second(self) -> float:
        """Images handled by this invocation (resumed ones excluded) per second."""
        done = self.recorded - self.resumed
        return done / self.seconds if self.seconds > 0 else 0.0


def path_identity(rel: str) -> int:
    """A 32-bit identity for an image from its relative path (keys its noise).

    The path's bytes as the file system holds them (``os.fsencode``), so a name that is not
    valid UTF-8 has an identity too; valid names give the same identity as their UTF-8 text.
    """
    return int.from_bytes(hashlib.sha256(os.fsencode(rel)).digest()[:4], "little")


def output_name(rel: Path) -> Path:
    """The output file of the input at relative path ``rel`` when no other input shares it."""
    return rel.with_suffix(".png")


def output_names(rels: Iterable[str]) -> dict[str, str]:
    """The output file of each input (relative paths): ``x.jpg`` -> ``x.png``, unless another
    input would get the same name, compared case-insensitively (``x.png`` and ``x.jpg``,
    ``A.png`` and ``a.PNG``). Then each of them keeps its whole name: ``x.jpg.png``,
    ``x.png.png``; names that still clash (differing only in case) get a short hash of the
    path: ``A.png.1f2e3d4c.png``. Names of the engine's own files count as taken."""
    rels = list(rels)
    names = {r: str(output_name(Path(r))) for r in rels}
    for attempt in (lambda r: r + ".png",
                    lambda r: f"{r}.{path_identity(r):08x}.png"):
        groups: dict[str, list[str]] = {}
        for r in rels:
            groups.setdefault(names[r].casefold(), []).append(r)
        clashes = [r for key, group in groups.items() for r in group
                   if len(group) > 1 or key in _OWN_FILES]
        if not clashes:
            break
        for r in clashes:
            names[r] = attempt(r)
    return names


@dataclass
class InputFile:
    """One discovered input: its path, its path relative to the input folder (the manifest's
    key), its output name, its size and mtime, and why it is refused (None: it is not)."""

    path: Path
    rel: str
    output: str
    source: dict[str, int] | None
    refused: str | None = None


def discover_inputs(input_dir: Path, follow_symlinks: bool = False) -> list[InputFile]:
    """The images under ``input_dir`` with their output names (:func:`output_names`).

    A link that resolves outside the input folder is refused unless ``follow_symlinks``: it
    gets an error record instead of being read.
    """
    from apudae_engine.images.codec import discover_images, outside_root

    files = list(discover_images(input_dir, follow_symlinks))
    rels = [os.path.relpath(f, input_dir) for f in files]
    names = output_names(rels)
    inputs = []
    for f, rel in zip(files, rels):
        refused = None
        if not follow_symlinks and outside_root(f, input_dir):
            refused = f"{f}: symlink outside the input folder; --follow-symlinks to allow"
        inputs.append(InputFile(f, rel, names[rel], source_of(f), refused))
    return inputs


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
    for folder in (output_dir, *output_dir.parents):
        if folder.exists() and not folder.is_dir():
            raise UserError(f"output folder {output_dir}: {folder} is a file, not a folder; "
                            "choose another --output")


def run_seed(out: Path, config: PurifyConfig) -> tuple[PurifyConfig, str]:
    """The config with the run's noise seed, and where it came from: ``given`` by the user,
    ``recorded`` in the output folder's run.json (a rerun without --seed resumes with it), or
    a new ``secret`` one (see ``PurifyConfig.seed``)."""
    if config.seed is not None:
        return config, "given"
    try:
        seed = json.loads((out / RUN_FILE).read_text())["config"]["seed"]
    except (OSError, ValueError, KeyError, TypeError):
        seed = None
    if isinstance(seed, int) and 0 <= seed < 2**32:
        return config.with_(seed=seed), "recorded"
    return config.with_secret_seed(), "secret"


def run_identity(purifier, config: dict[str, Any], precision: str, classifier_sha256: str | None,
                 input_dir: Path, reject_flagged: bool = False) -> dict[str, Any]:
    """What makes two runs the same run: a rerun resumes only when all of this is equal.

    The input folder is part of it: the same output folder with another input is refused.
    So is ``reject_flagged`` (present only when set, so that folders written before the
    option existed still resume).
    """
    ck = purifier.checkpoint
    identity = {"engine": __version__, "dae_sha256": ck.weights_sha256 if ck else None,
                "mu": purifier.mu, "sigma": purifier.sigma,
                "classifier_sha256": classifier_sha256, "config": config,
                "input_shape": list(purifier.input_shape or []), "precision": precision,
                "input": os.fsdecode(os.path.realpath(input_dir))}
    if reject_flagged:
        identity["reject_flagged"] = True
    return identity


def source_of(path: Path) -> dict[str, int] | None:
    """What a record keeps of its input file to notice a later change: size and mtime."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def prepare_output(out: Path, identity: dict[str, Any], overwrite: bool,
                   planned: dict[str, str], sources: dict[str, dict | None],
                   run: dict[str, Any] | None = None) -> dict[str, dict]:
    """Validate the output folder (under its lock) and write run.json; return the records of
    images that need no work: recorded rejected, or recorded ok with the same output name and
    the output present with its recorded size. ``planned`` maps each input to its output name,
    ``sources`` to its size and mtime.

    Refused without ``overwrite``: a folder holding other files, another run's results (other
    settings, models or input folder), or recorded inputs that changed since.
    """
    run_file, manifest = out / RUN_FILE, out / MANIFEST
    records: dict[str, dict] = {}
    try:
        entries = [p.name for p in out.iterdir() if p.name != LOCK_FILE]
    except OSError as exc:
        raise output_error(exc, out) from None
    if entries:
        previous = None
        if run_file.is_file():
            try:
                previous = json.loads(run_file.read_text())
                previous.pop("ran", None)  # what ran may differ between the runs of one run
            except (OSError, ValueError, AttributeError):
                previous = None
        same = previous == identity
        if not same and not overwrite:
            what = "results of a run with different settings, models or input folder" \
                if previous else "files not written by apudae-engine"
            raise UserError(f"output folder {out} already holds {what}; pass --overwrite to "
                            "replace them or choose another --output")
        if same and manifest.is_file():
            records = _changed_inputs_checked(read_records(manifest), sources, overwrite)
        if not same:
            manifest.unlink(missing_ok=True)
            (out / SUMMARY).unlink(missing_ok=True)
    try:
        if removed := remove_partial_files(out):
            log.info("removed %d partial files left by an interrupted run", removed)
        doc = {**identity, "ran": run or {}}
        write_atomic(run_file, (json.dumps(doc, indent=2) + "\n").encode())
        if manifest.is_file():
            _drop_torn_tail(manifest)
    except OSError as exc:
        raise output_error(exc, out) from None
    done = {}
    for p, r in records.items():
        if r.get("status") == "rejected" and p in planned:
            done[p] = r  # no output to check: rejected is the answer
            continue
        if r.get("status") != "ok" or r.get("output") != planned.get(p):
            continue
        try:
            size = (out / r["output"]).stat().st_size
        except OSError:
            continue
        if size == r.get("bytes", size or -1):  # records of older versions have no bytes
            done[p] = r
        else:
            log.warning("%s: recorded output %s has %d bytes, not %s; redoing it", p,
                        out / r["output"], size, r.get("bytes"))
    return done


def _changed_inputs_checked(records: dict[str, dict], sources: dict[str, dict | None],
                            overwrite: bool) -> dict[str, dict]:
    changed = [p for p, r in records.items() if p in sources and r.get("source") is not None
               and sources[p] is not None and r["source"] != sources[p]]
    if changed and not overwrite:
        more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
        raise UserError(f"input {changed[0]!r}{more} changed (size or mtime) since it was "
                        "purified into this output folder; pass --overwrite to redo changed "
                        "inputs or choose another --output")
    return {p: r for p, r in records.items() if p not in changed}


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
    """Append records and fsync them; call only after their output files are in place.

    Names that are not valid UTF-8 are kept as JSON escapes of their surrogates
    (``\\udcff``), which read back to the same path.
    """
    for rec in records:
        manifest.write(json.dumps(rec) + "\n")
    manifest.flush()
    os.fsync(manifest.fileno())


def commit_records(manifest: IO[str], summary: Summary, records: list[dict]) -> None:
    """Append a batch's records (after its files are in place), then count them in
    ``summary`` and log the errors; a failed append counts nothing."""
    append_records(manifest, records)
    for rec in records:
        if rec["status"] in ("ok", "rejected"):
            summary.ok += rec["status"] == "ok"
            summary.rejected += rec["status"] == "rejected"
            summary.flagged += int(rec["flagged"])
        else:
            log.error("%s", rec["error"])
            summary.failed += 1


def image_record(path: str, *, error: str | None = None, outcome: ImageOutcome | None = None,
                 output: str | None = None, steps: int = 0, labels: list[str] | None = None,
                 source: dict | None = None, nbytes: int | None = None) -> dict:
    """The manifest record of one input: an error record when ``error`` is given or the
    ``outcome`` (:class:`~apudae_engine.folder.batch.ImageOutcome`) is an error; a rejected
    record (no output, no label after purification) when it is rejected; else an ok record
    writing ``output``. Class names come from ``labels``, ``source`` is the input's size and
    mtime (:func:`source_of`), ``nbytes`` the output's size."""
    if error is None and outcome.status == "error":
        error = outcome.error
    if error is not None:
        rec = {"path": path, "status": "error", "error": error}
    else:
        ok = outcome.status == "ok"
        rec = {"path": path, "status": outcome.status, **({"output": output} if ok else {}),
               "r_before": round(float(outcome.r_before), 6),
               "r_after": round(float(outcome.r_after), 6), "flagged": bool(outcome.flagged),
               "active_steps": int(outcome.active_steps), "steps": int(steps)}
        rec.update(outcome.label_fields(labels))
        if nbytes is not None:
            rec["bytes"] = int(nbytes)
    if source is not None:
        rec["source"] = source
    return rec


def resumed_summary(out: Path, total: int, todo: int, done: dict[str, dict]) -> Summary:
    """The run's Summary before any work: the images recorded by an earlier run count as done."""
    summary = Summary(total=total, resumed=total - todo)
    summary.rejected = sum(1 for r in done.values() if r.get("status") == "rejected")
    summary.resumed_rejected = summary.rejected
    summary.ok = summary.resumed - summary.rejected
    summary.flagged = sum(1 for r in done.values() if r.get("flagged"))
    if summary.resumed:
        log.info("resuming: %d of %d images already done in %s", summary.resumed, total, out)
    return summary


def finish(out: Path, summary: Summary, preview: list) -> None:
    """Sort the manifest, write summary.json (and the preview), and log the outcome.

    summary.json holds the totals of the whole folder and, in ``runs``, every invocation's
    own counts, rate and what ran (a resumed run adds to the list, it does not replace it).
    """
    records = read_records(out / MANIFEST)
    body = "".join(json.dumps(records[k]) + "\n" for k in sorted(records))
    write_atomic(out / MANIFEST, body.encode())
    runs = []
    with suppress(OSError, ValueError, AttributeError):
        runs = list(json.loads((out / SUMMARY).read_text()).get("runs", []))
    resumed_ok = summary.resumed - summary.resumed_rejected
    runs.append({**summary.run, "ok": summary.ok - resumed_ok,
                 "rejected": summary.rejected - summary.resumed_rejected,
                 "failed": summary.failed, "resumed": summary.resumed,
                 "seconds": round(summary.seconds, 3),
                 "images_per_second": round(summary.images_per_second, 1)})
    doc = {"total": summary.total, "ok": summary.ok, "rejected": summary.rejected,
           "failed": summary.failed, "resumed": summary.resumed, "flagged": summary.flagged,
           "seconds": round(summary.seconds, 3),
           "images_per_second": round(summary.images_per_second, 1),
           "stage_seconds": {k: round(v, 3) for k, v in summary.stage_seconds.items()}}
    if summary.verify:
        doc["verify"] = {"batches": len(summary.verify),
                         "max_abs_diff": max(r["max_abs_diff"] for r in summary.verify),
                         "records": summary.verify}
    doc["runs"] = runs
    write_atomic(out / SUMMARY, (json.dumps(doc, indent=2) + "\n").encode())
    if preview:
        from apudae_engine.images.preview import write_preview

        write_preview(out / PREVIEW, preview)
    worked = summary.recorded - summary.resumed
    rate = f"{summary.images_per_second:.1f} img/s" if worked else "nothing left to do"
    rejected = f"{summary.rejected} rejected, " if summary.rejected else ""
    log.info("done: %d ok (%d resumed), %s%d failed, %d flagged as likely adversarial; %s; "
             "manifest %s", summary.ok, summary.resumed, rejected, summary.failed,
             summary.flagged, rate, out / MANIFEST)
    if summary.failed:
        log.warning("%d images could not be purified; see the error records in %s",
                    summary.failed, out / MANIFEST)
