"""Scheduling an evaluation's batches through OUT/parts: which to read, claim, compute or await.

A table's work (:class:`Table`) is split into batches. A :class:`Scheduler` reads the batches
whose parts are already in the folder (``parts``), claims and computes the missing ones with
the scoring function it is given, waits for those other workers hold, and merges a table's
parts into its rows (``outcomes``) in batch order. So a killed run resumes at its first
missing batch, several processes share one run, and either way the rows are those of one
uninterrupted run. What a batch holds and how it is scored is the ``Evaluator``'s (``run``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from apudae_engine import Purifier
from apudae_engine.core.progress import progress
from apudae_engine.evaluation import parts
from apudae_engine.evaluation.attacks import AttackSpec
from apudae_engine.evaluation.outcomes import Row, merge_rows, rows_from_part, rows_to_part
from apudae_engine.evaluation.parts import PartStore

log = logging.getLogger(__name__)


@dataclass
class Table:
    """One table's work: ``rows`` on the first ``count`` images, in batches of ``batch``."""

    key: str  # oblivious, defense_aware or sweep: the table's key and its parts' prefix
    rows: list[str | AttackSpec]
    count: int
    batch: int
    purifier: Purifier | None
    title: str

    def batches(self, offset: int) -> list[tuple[int, int, int]]:
        """(index in the split, start, stop) of each batch; start/stop in the images after
        the split's first ``offset`` (--offset)."""
        first = offset // self.batch
        return [(first + b, start, min(start + self.batch, self.count))
                for b, start in enumerate(range(0, self.count, self.batch))]


# score(table, batch index, start, stop, heartbeat): the batch's rows, scored on every
# defense; heartbeat() is called after each row.
ScoreBatch = Callable[[Table, int, int, int, Callable[[], None]], list[Row]]


class Scheduler:
    """The batches of one run in its parts folder, as one worker sees and computes them.

    Args:
        store: the run's parts folder.
        offset: the first image's index in the split (--offset).
        defenses: the defenses every part must hold, in order.
        scored_with: the ``device`` and ``backend`` recorded in the parts this worker writes.
    """

    def __init__(self, store: PartStore, offset: int, defenses: list[str],
                 scored_with: dict[str, str]) -> None:
        self.store = store
        self.offset = offset
        self.defenses = list(defenses)
        self.scored_with = scored_with
        self._done: dict[str, tuple[list[Row], dict[str, Any]]] = {}  # part name -> rows, meta
        self._computed: set[str] = set()  # parts this process computed

    def _name(self, t: Table, g: int, start: int, stop: int) -> str:
        return self.store.name(t.key, g, stop - start, t.batch)

    def done(self, t: Table) -> int:
        """How many of ``t``'s batches are in the folder (those that are get read)."""
        return sum(self._load(t, g, start, stop, self._name(t, g, start, stop))
                   for g, start, stop in t.batches(self.offset))

    def _load(self, t: Table, g: int, start: int, stop: int, name: str) -> bool:
        """Whether batch ``g``'s part is there, whole and of these rows (then cached)."""
        if name in self._done:
            return True
        got = self.store.read(name)
        if got is None:
            return False
        meta, arrays = got
        expected = {"table": t.key, "batch": g,
                    "images": [self.offset + start, self.offset + stop],
                    "row_names": [r if isinstance(r, str) else r.name for r in t.rows]}
        try:
            found = {k: meta.get(k) for k in expected}
            found["row_names"] = [r["name"] for r in meta["rows"]]
            if found != expected:
                raise ValueError(f"it holds {found}, expected {expected}")
            rows = rows_from_part(meta["rows"], arrays, stop - start)
            if any(list(r.correct) != self.defenses for r in rows):
                raise ValueError("other defenses")
        except (KeyError, ValueError, TypeError) as exc:
            self.store.damaged(name, exc)
            return False
        self._done[name] = (rows, meta)
        return True

    def compute(self, jobs: list[Table], score: ScoreBatch, wait: bool = True,
                t_start: float | None = None) -> bool:
        """Compute the batches of ``jobs`` missing from the parts folder with ``score``,
        taking each by a claim, then wait for those other workers hold.

        Returns whether every batch is done; False only without ``wait``, when other workers
        still hold batches (the last of them writes the report). ``t_start``: the
        ``time.perf_counter()`` the progress lines count from (default: now).
        """
        store = self.store
        t_start = time.perf_counter() if t_start is None else t_start
        while True:
            for t in jobs:
                self._compute_table(t, score, t_start)
            missing = self.missing(jobs)
            if not missing:
                return True
            holders = ", ".join(store.holders(missing))
            if not holders:  # released between the pass and now: take them
                continue
            if not wait:
                log.info("%d batches are being computed by other workers (%s); the last of "
                         "them writes the report", len(missing), holders)
                return False
            log.info("waiting for %d batches other workers hold (%s); looking again every "
                     "%g s", len(missing), holders, parts.POLL_SECONDS)
            time.sleep(parts.POLL_SECONDS)

    def missing(self, jobs: list[Table]) -> list[str]:
        """Parts of ``jobs`` not in the folder yet (those that are get read)."""
        missing = []
        for t in jobs:
            for g, start, stop in t.batches(self.offset):
                name = self._name(t, g, start, stop)
                if not self._load(t, g, start, stop, name):
                    missing.append(name)
        return missing

    def _compute_table(self, t: Table, score: ScoreBatch, t_start: float) -> None:
        """One pass over ``t``'s batches: compute each that is missing and can be claimed."""
        store, bar = self.store, None
        try:
            for g, start, stop in t.batches(self.offset):
                name = self._name(t, g, start, stop)
                if self._load(t, g, start, stop, name) or not store.claim(name):
                    continue
                try:
                    if self._load(t, g, start, stop, name):  # finished while we looked
                        continue
                    if bar is None:  # a bar only on passes that compute (not while waiting)
                        done = sum(self._done[n][1]["images"][1] - self._done[n][1]["images"][0]
                                   for n in self._done if self._done[n][1]["table"] == t.key)
                        bar = progress(total=t.count * len(t.rows), initial=done * len(t.rows),
                                       desc=t.title, unit="img")
                    bar.set_postfix(batch=g)
                    rows = score(t, g, start, stop, lambda n=name: store.touch(n))
                    meta_rows, arrays = rows_to_part(rows)
                    meta = {"table": t.key, "batch": g,
                            "images": [self.offset + start, self.offset + stop],
                            "rows": meta_rows, "scored_with": dict(self.scored_with)}
                    store.write(name, meta, arrays)
                    self._done[name] = (rows, {**meta, "worker": store.worker})
                    self._computed.add(name)
                finally:
                    store.release(name)
                bar.update((stop - start) * len(t.rows))
                log.info("%s: batch %d (images %d-%d) written, %.0f s into this run", t.title,
                         g, self.offset + start + 1, self.offset + stop,
                         time.perf_counter() - t_start)
        finally:
            if bar is not None:
                bar.close()

    def rows(self, t: Table) -> list[Row]:
        """``t``'s rows over all its batches, from the parts, in batch order."""
        names = [self._name(t, g, start, stop) for g, start, stop in t.batches(self.offset)]
        return merge_rows([self._done[n][0] for n in names])

    def summary(self, jobs: list[Table]) -> dict[str, Any]:
        """Which parts the tables came from: count, workers, attack time summed over parts."""
        metas = [self._done[self._name(t, g, start, stop)][1]
                 for t in jobs for g, start, stop in t.batches(self.offset)]
        workers = {(m["worker"]["host"], m["worker"]["pid"]) for m in metas}
        scored = {(m["scored_with"]["device"], m["scored_with"]["backend"]) for m in metas}
        if len(scored) > 1:
            log.warning("the parts were scored on several devices or backends: %s",
                        ", ".join(f"{d} {b}" for d, b in sorted(scored)))
        return {"folder": str(self.store.folder), "used": len(metas),
                "computed_by_this_process": len(self._computed),
                "workers": [{"host": h, "pid": p} for h, p in sorted(workers)],
                "scored_with": [{"device": d, "backend": b} for d, b in sorted(scored)],
                "attack_cpu_seconds": round(sum(r.get("attack_cpu_seconds", 0.0) for m in metas
                                                for r in m["rows"]), 2),
                "attack_seconds": round(sum(r["attack_seconds"] for m in metas
                                            for r in m["rows"]), 2)}
