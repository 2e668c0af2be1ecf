"""Progress of long runs: a bar on a terminal, one log line per update elsewhere.

On a terminal a tqdm bar shows done/total, the rate and the ETA, and log records are written
above it instead of through it. When stderr is a log file or a pipe (CI, nohup, a scheduler),
each update instead logs one line: done/total, rate, ETA and the fields given to
``set_postfix`` (for ``purify``: ok, failed, flagged so far). ``APUDAE_PROGRESS=1`` forces
the bar, ``=0`` turns both off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import Any

log = logging.getLogger("apudae_engine.progress")


def _mode() -> str:
    forced = os.environ.get("APUDAE_PROGRESS")
    if forced == "0":
        return "off"
    if forced == "1" or sys.stderr.isatty():
        return "bar"
    return "lines"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Progress:
    """A tqdm-like progress reporter (``update``, ``set_postfix``, ``close``, ``with``).

    Args:
        total: units of work in the whole run (resumed ones included).
        initial: units already done before this invocation (they do not count in the rate).
        desc, unit: what is counted, for the bar and the log lines.
        min_interval: seconds between two log lines (the last update always logs).
    """

    def __init__(self, total: int | None = None, initial: int = 0, desc: str = "",
                 unit: str = "it", min_interval: float = 0.0, **_: Any) -> None:
        self.total, self.n, self.initial = total, initial, initial
        self.desc, self.unit, self.min_interval = desc, unit, min_interval
        self.fields: dict[str, Any] = {}
        self.start = time.perf_counter()
        self._last_line = float("-inf")
        self.mode = _mode()
        self._bar = None
        self._redirect = contextlib.ExitStack()
        if self.mode == "bar":
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit,
                             file=sys.stderr, mininterval=0.5, dynamic_ncols=True)
            # Log records go above the bar instead of breaking its line.
            self._redirect.enter_context(logging_redirect_tqdm(
                loggers=[logging.getLogger("apudae_engine"), logging.root]))

    @property
    def rate(self) -> float:
        """Units per second done by this invocation."""
        elapsed = time.perf_counter() - self.start
        return (self.n - self.initial) / elapsed if elapsed > 0 else 0.0

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "lines":
            now = time.perf_counter()
            done = self.total is not None and self.n >= self.total
            if done or now - self._last_line >= self.min_interval:
                self._last_line = now
                log.info("%s", self.line())

    def set_postfix(self, **fields: Any) -> None:
        """Counters shown beside the progress (they describe the work committed so far)."""
        self.fields.update(fields)
        if self._bar is not None:
            self._bar.set_postfix(**fields, refresh=False)

    def line(self) -> str:
        """The log line: ``desc: done/total (pct), rate, ETA; fields``."""
        parts = [f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total else "")]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f} %)"
        rate = self.rate
        parts.append(f"{rate:.1f} {self.unit}/s")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"ETA {_duration((self.total - self.n) / rate)}")
        text = ", ".join(parts)
        if self.fields:
            text += "; " + ", ".join(f"{k} {v}" for k, v in self.fields.items())
        return text

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._redirect.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(**kwargs: Any) -> Progress:
    """A :class:`Progress` (keywords as for tqdm: total, initial, desc, unit)."""
    return Progress(**kwargs)
