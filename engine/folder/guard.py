"""Guards of an output folder: the lock that keeps one run at a time, and one-line errors.

A run holds ``fcntl.flock`` on ``OUT/.lock`` from before it validates the folder until it
ends; the file holds the holder's pid, host and start time for the message a second run
gets. An ``OSError`` while writing becomes one :class:`UserError` line naming the path and the
reason (:func:`output_error`), and a run the folder cannot take stops with
:func:`stopped_error`.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from apudae_engine.core.errors import UserError
from apudae_engine.core.files import PART_SUFFIX

LOCK_FILE = ".lock"


def output_error(exc: OSError, path: Path | str) -> UserError:
    """One line naming the output path and why it cannot be written."""
    reason = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
              errno.EFBIG: "the file size limit was reached (ulimit -f)",
              errno.EROFS: "the file system is read-only",
              errno.EACCES: "permission denied", errno.EPERM: "permission denied",
              errno.ENOTDIR: "a part of the path is a file, not a folder",
              errno.EEXIST: "a part of the path is a file, not a folder",
              errno.EISDIR: "a folder is in the way"}.get(exc.errno)
    reason = reason or (exc.strerror or str(exc))
    where = exc.filename or path
    if PART_SUFFIX in os.path.basename(os.fsdecode(where)):  # name the output, not its temporary
        where = path
    return UserError(f"cannot write the output {where}: {reason}")


# Write errors that concern one file's name or place: that image gets an error record and the
# run goes on. Any other (full disk, size limit, read-only, permissions) stops the run.
ONE_FILE_ERRORS = (errno.ENAMETOOLONG, errno.EISDIR, errno.ENOTDIR, errno.EEXIST)


def stopped_error(exc: OSError, out: Path, manifest: Path, recorded: int) -> UserError:
    """The one line that ends a run the output folder cannot take (disk full, read-only...)."""
    return UserError(f"{output_error(exc, out)}; stopped cleanly with {recorded} images "
                     f"recorded in {manifest} (this run's partial files removed); fix "
                     "that and rerun the same command to resume")


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold the output folder's advisory lock (``fcntl.flock`` on OUT/.lock) for a run.

    A second run on the same folder fails at once with a UserError naming the holder's pid,
    host and start time. The lock is released when the run ends, however it ends.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise output_error(exc, out) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:
                holder = {}
            raise UserError(
                f"output folder {out} is in use by another run (pid {holder.get('pid', '?')} "
                f"on {holder.get('host', '?')}, started {holder.get('started', '?')}); wait for "
                "it to finish or choose another --output") from None
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
        except OSError:
            pass  # the lock holds without the note (a full disk is reported by the run)
        yield
    finally:
        os.close(fd)  # releases the lock
