"""Files written whole or not at all: every file the engine writes goes through here."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

PART_SUFFIX = ".part"  # temporary names are ".<name>.part<pid>" beside the target


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a fsynced temporary file and a rename.

    After a crash the path holds either its old content or all of ``data``, never part of it:
    the temporary file is flushed to disk before the rename makes it visible.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary name is capped at 255 bytes (NAME_MAX), so any name that fits fits too.
    suffix = f"{PART_SUFFIX}{os.getpid()}"
    stem = os.fsencode(path.name)
    if len(stem) > 254 - len(suffix):  # keep two long names that share a prefix apart
        digest = hashlib.sha256(stem).hexdigest()[:8].encode()
        stem = stem[:245 - len(suffix)] + b"~" + digest
    tmp = path.with_name(os.fsdecode(b"." + stem) + suffix)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
