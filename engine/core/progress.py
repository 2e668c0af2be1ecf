"""Progress bars on stderr, shown only on a terminal (logs carry the milestones elsewhere)."""

from __future__ import annotations

import os
import sys
from typing import Any


def progress(**kwargs: Any):
    """A tqdm bar; APUDAE_PROGRESS=1 forces it on, =0 off, otherwise only on a TTY."""
    from tqdm import tqdm

    forced = os.environ.get("APUDAE_PROGRESS")
    disable = None if forced is None else forced == "0"
    return tqdm(file=sys.stderr, disable=disable, mininterval=0.5, dynamic_ncols=True, **kwargs)
