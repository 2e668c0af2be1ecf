"""An evaluation's batches on disk: part files, the run's identity, and claims between workers.

Every batch a run scores is written whole to ``OUT/parts/<table>-b<batch>.npz`` (the batch's
index counted from the split's start; ``-n<images>`` follows for a short last batch), so a
killed run resumes at the first missing batch and several processes, on one machine or on
several sharing the folder, can work on one run.

- **Identity.** ``OUT/parts/identity.json`` holds the settings that change results (weights,
  data, threat model, attacks, defenses, seeds, batch sizes; see ``Evaluator.identity``) and
  their SHA-256 fingerprint. A run with another identity stops with one error naming the
  first differing field; parts are never mixed across identities. Image ranges (--limit,
  --offset), the output folder, threads, device and scoring backend are not part of it.
- **Claims.** A worker takes a batch by creating ``<part>.claim`` with O_CREAT|O_EXCL (pid,
  host, a token, start time) and touches it after each row. A claim is stale, and taken
  over, when its pid is dead on this host, or, from another host, when it was not touched
  for ``STALE_SECONDS``. Two workers that both take over one stale claim at once may both
  compute the batch: harmless, since parts are deterministic and written atomically.
- **Damage.** A part that cannot be read whole, or does not match, is reported once and
  computed again.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from apudae_engine.core.errors import UserError
from apudae_engine.core.files import write_atomic

log = logging.getLogger(__name__)

IDENTITY_FILE = "identity.json"
CLAIM_SUFFIX = ".claim"
# A claim from another host that was not touched for this long is taken over. Touched after
# every row, so this only has to exceed one row of one batch (minutes on a CPU).
STALE_SECONDS = 2 * 3600.0
# A claim file that is empty or unreadable for this long was left by a crash while creating it.
UNREADABLE_SECONDS = 60.0
POLL_SECONDS = 10.0  # how often a waiting worker looks for the others' parts


def fingerprint(identity: dict[str, Any]) -> str:
    """SHA-256 of the identity's canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def first_difference(ours: dict[str, Any], theirs: dict[str, Any]) -> tuple[str, Any, Any]:
    """(dotted field, our value, their value) of the first field that differs."""
    a, b = _flatten(json.loads(json.dumps(ours))), _flatten(theirs)
    for key in [*a, *(k for k in b if k not in a)]:
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            return key, a.get(key, "<absent>"), b.get(key, "<absent>")
    return "?", None, None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


class PartStore:
    """The parts folder of one run identity, as seen by one worker.

    Args:
        folder: ``OUT/parts``.
        identity: the run's identity (JSON-ready); checked against, or written to,
            ``identity.json``.
        fresh: delete the folder first (refused while a live worker holds a claim in it).
    """

    def __init__(self, folder: Path, identity: dict[str, Any], fresh: bool = False) -> None:
        self.folder = Path(folder)
        self.identity = identity
        self.fingerprint = fingerprint(identity)
        self.host = socket.gethostname()
        self.token = uuid.uuid4().hex  # tells this worker's claims from its threads' siblings
        self.worker = {"host": self.host, "pid": os.getpid()}
        self._warned: set[str] = set()
        if fresh and self.folder.exists():
            live = [p.name for p in self.folder.glob(f"*{CLAIM_SUFFIX}") if not self._stale(p)]
            if live:
                raise UserError(f"--fresh would discard the work of live workers in "
                                f"{self.folder} (claims {', '.join(sorted(live)[:3])}); stop "
                                "them first, or start further workers without --fresh")
            shutil.rmtree(self.folder)
            log.info("--fresh: deleted %s", self.folder)
        self._check_identity()

    def _check_identity(self) -> None:
        path = self.folder / IDENTITY_FILE
        mine = {"fingerprint": self.fingerprint, "identity": self.identity}
        if not path.exists():
            # Written whole under this worker's own name, then linked: of workers starting at
            # once, the first link wins and no later one overwrites it.
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.folder / f".{IDENTITY_FILE}.{self.token}"
            try:
                write_atomic(tmp, (json.dumps(mine, indent=2) + "\n").encode())
                with contextlib.suppress(FileExistsError):
                    os.link(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        try:  # read back: another worker's identity may have been first
            stored = json.loads(path.read_text())
            theirs, their_fp = stored["identity"], stored["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{path} is unreadable ({exc}); pass --fresh to start the run "
                            "over, or choose another --out") from None
        if their_fp != self.fingerprint:
            key, ours, other = first_difference(self.identity, theirs)
            raise UserError(f"{self.folder} holds batches of another run: {key} is {other!r} "
                            f"there and {ours!r} here; rerun with the same settings, choose "
                            "another --out, or pass --fresh to discard them")

    def name(self, table: str, batch: int, size: int, full: int) -> str:
        """File stem of a batch's part: ``oblivious-b000012``, ``-n7`` after a short batch."""
        return f"{table}-b{batch:06d}" + ("" if size == full else f"-n{size}")

    # Part files.

    def write(self, name: str, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Write a part whole (fsynced temporary file, then rename)."""
        meta = {**meta, "fingerprint": self.fingerprint, "worker": self.worker}
        buf = io.BytesIO()
        np.savez_compressed(buf, meta=np.array(json.dumps(meta)), **arrays)
        path = self.folder / f"{name}.npz"
        try:
            write_atomic(path, buf.getvalue())
        except OSError as exc:  # full disk, read-only...: one line, the parts so far are kept
            raise UserError(f"cannot write the part {path}: {exc.strerror or exc}; the batches "
                            "written so far are kept, rerun the same command to resume") from None

    def read(self, name: str) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
        """A part's metadata and arrays; None when absent, or damaged (with one warning)."""
        path = self.folder / f"{name}.npz"
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                arrays = {k: z[k] for k in z.files if k != "meta"}  # reads (and CRC-checks) all
            if meta.get("fingerprint") != self.fingerprint:
                raise ValueError("it belongs to another run identity")
            return meta, arrays
        except Exception as exc:  # any damage: zip, npy header, JSON, CRC
            self.damaged(name, exc)
            return None

    def damaged(self, name: str, exc: Exception | str) -> None:
        """Report a part that cannot be used, once; it is treated as missing."""
        if name not in self._warned:
            self._warned.add(name)
            log.warning("%s/%s.npz is damaged or does not match (%s); computing that batch "
                        "again", self.folder, name, exc)

    def exists(self, name: str) -> bool:
        return (self.folder / f"{name}.npz").exists()

    # Claims.

    def claim(self, name: str) -> bool:
        """Take batch ``name`` for this worker; False when a live worker holds it."""
        path = self.folder / f"{name}{CLAIM_SUFFIX}"
        record = json.dumps({**self.worker, "token": self.token, "started": time.time(),
                             "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode()
        for _ in range(3):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                if not self._take_over(path):
                    return False
                continue
            try:
                os.write(fd, record)
            finally:
                os.close(fd)
            return True
        return False

    def touch(self, name: str) -> None:
        """Heartbeat: the claim is still being worked on."""
        with contextlib.suppress(OSError):
            os.utime(self.folder / f"{name}{CLAIM_SUFFIX}")

    def release(self, name: str) -> None:
        """Remove this worker's claim (not one another worker took over meanwhile)."""
        path = self.folder / f"{name}{CLAIM_SUFFIX}"
        holder = self._holder(path)
        if holder is not None and holder.get("token") == self.token:
            path.unlink(missing_ok=True)

    def holders(self, names: list[str]) -> list[str]:
        """'pid N on HOST' of the claims on ``names``, for waiting messages; empty when none
        of them is claimed."""
        out = set()
        for name in names:
            path = self.folder / f"{name}{CLAIM_SUFFIX}"
            holder = self._holder(path)
            if holder:
                out.add(f"pid {holder.get('pid')} on {holder.get('host')}")
            elif path.exists():
                out.add(f"an unreadable claim {path.name}")
        return sorted(out)

    def _holder(self, path: Path) -> dict[str, Any] | None:
        try:
            holder = json.loads(path.read_bytes())
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def _stale(self, path: Path) -> bool:
        holder = self._holder(path)
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return True
        if holder is None:
            return age > UNREADABLE_SECONDS
        pid = holder.get("pid")
        if holder.get("host") == self.host and isinstance(pid, int) and pid > 0:
            return not _pid_alive(pid)
        return age > STALE_SECONDS

    def _take_over(self, path: Path) -> bool:
        """Remove a stale claim so it can be taken; False when it is live."""
        try:
            seen = path.read_bytes()
        except FileNotFoundError:
            return True  # released meanwhile
        if not self._stale(path):
            return False
        # Rename first: of two workers taking over one claim, one rename wins. If what was
        # renamed is no longer the stale claim (taken meanwhile), it is put back.
        grave = path.with_name(f".{path.name}.stale-{self.token}")
        try:
            os.rename(path, grave)
        except FileNotFoundError:
            return True
        if grave.read_bytes() != seen:
            with contextlib.suppress(OSError):
                os.link(grave, path)
            grave.unlink(missing_ok=True)
            return False
        grave.unlink(missing_ok=True)
        log.warning("took over %s: stale claim %s", path, seen.decode(errors="replace")[:200])
        return True
