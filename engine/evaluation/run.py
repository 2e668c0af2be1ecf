"""Robustness evaluation: accuracy of each defense under each attack, and detection by r(x).

Rows are inputs (clean, uniform noise, each attack); columns are defenses (no defense, direct
DAE, iterative, adaptive with the corrected defaults, adaptive as the authors' code runs it).
Two tables are kept apart: *oblivious* attacks crafted on the bare classifier (the authors'
setting) and *defense-aware* attacks crafted against one purifier (``aware_target``). A PGD
sweep over epsilon feeds the accuracy-vs-eps plot. ``config`` holds the settings,
``report`` writes results.json, results.md and the plots.

Each batch of each table is written to OUT/parts as soon as it is scored (``parts``, in the
form of ``outcomes``), and the tables are always built from those parts: a killed run resumes
at its first missing batch, several processes share one run by claiming batches, and either
way the numbers are those of one uninterrupted run.

Example::

    results = evaluate(EvalConfig(model="fmnist", dataset="fashion-mnist", quick=True,
                                  out_dir="runs/eval-quick"))
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from apudae_engine._version import __version__
from apudae_engine.backends.purifier import Purifier
from apudae_engine.core.errors import UserError
from apudae_engine.core.host import describe, resolve_device
from apudae_engine.core.numerics import ieee_fp32_convolutions
from apudae_engine.core.progress import progress
from apudae_engine.evaluation import parts
from apudae_engine.evaluation.attacks import AttackSpec, perturbation_norm, run_attack
from apudae_engine.evaluation.attacks.aware import held_out_seeds
from apudae_engine.evaluation.config import EvalConfig
from apudae_engine.evaluation.outcomes import Row, merge_rows, rows_from_part, rows_to_part
from apudae_engine.evaluation.parts import PartStore
from apudae_engine.images.datasets import load_dataset
from apudae_engine.method.checkpoint import classifier_source, load_checkpoint
from apudae_engine.method.config import PurifyConfig
from apudae_engine.method.purification import purify, reconstruction_error

log = logging.getLogger(__name__)

WORST_CASE = "worst-case"  # table key of the per-image worst case over the L-inf attacks
_SEED_STRIDE = 7919  # batch b's attacks and noise use seed + _SEED_STRIDE * b


def roc_auc(negative: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve for scores where higher means positive (Mann-Whitney U).

    Ties get their average rank. Returns NaN when either group is empty.
    """
    n_neg, n_pos = negative.numel(), positive.numel()
    if n_neg == 0 or n_pos == 0:
        return float("nan")
    scores = torch.cat([negative.flatten(), positive.flatten()]).double()
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    ranks = torch.empty_like(scores)
    ranks[scores.argsort()] = torch.arange(1, scores.numel() + 1, dtype=torch.float64)
    mean_rank = torch.zeros(counts.numel(), dtype=torch.float64).index_add_(0, inverse, ranks)
    ranks = (mean_rank / counts)[inverse]
    u = ranks[n_neg:].sum().item() - n_pos * (n_pos + 1) / 2
    return u / (n_neg * n_pos)


@dataclass
class _Table:
    """One table's work: ``rows`` on the first ``count`` images, in batches of ``batch``."""

    key: str  # oblivious, defense_aware or sweep: the table's key and its parts' prefix
    rows: list[str | AttackSpec]
    count: int
    batch: int
    purifier: Purifier | None
    title: str


class Evaluator:
    """Loads the models and data of an :class:`EvalConfig` and computes its tables."""

    def __init__(self, config: EvalConfig) -> None:
        self.config = config.resolved()
        c = self.config
        self.device = resolve_device(c.device)
        self.base = Purifier.from_pretrained(c.model, device=self.device)
        if self.base.mu is None:
            raise UserError(f"DAE {c.model} has no calibration; run `apudae-engine calibrate "
                            f"--model {c.model}` first")
        self.classifier_ckpt = load_checkpoint(self._classifier_ref(), "classifier")
        self.classifier = self.classifier_ckpt.model.to(self.device).eval()
        split = load_dataset(c.dataset, c.split, c.data_dir, self.base.checkpoint.input_shape)
        self.data = split.subset(c.limit, c.offset)
        self.data_sha256 = _images_sha256(split.images, split.labels)  # the run's identity
        cal_data = (self.base.checkpoint.calibration or {}).get("data")
        if cal_data and cal_data == self.data.source:
            raise UserError(f"the DAE was calibrated on {cal_data}, the data being evaluated")
        shape = tuple(self.data.images.shape[1:])
        for ck in (self.base.checkpoint, self.classifier_ckpt):
            if ck.input_shape != shape:
                raise UserError(f"{ck.path} expects images {ck.input_shape} but {self.data.source}"
                                f" holds {shape}")
        seed = c.seed
        configs = {"direct": PurifyConfig(method="direct", seed=seed),
                   "iterative": PurifyConfig(method="iterative", seed=seed),
                   "adaptive": PurifyConfig(seed=seed),
                   "adaptive-compat": PurifyConfig.compat(seed=seed)}
        # The defenses as purify runs them: the model's tuned settings (apudae-engine tune)
        # unless --method-defaults; compat always keeps the authors' own.
        tuned = None if c.method_defaults else self.base.checkpoint.purify_defaults
        configs = {d: config.with_model_defaults(tuned) for d, config in configs.items()}
        dae, mu, sigma = self.base.dae, self.base.mu, self.base.sigma
        self.defenses: dict[str, Purifier | None] = {
            d: None if d == "none" else Purifier(dae, mu, sigma, configs[d]) for d in c.defenses}
        self.target = Purifier(dae, mu, sigma, configs[c.aware_target])
        # Scoring the defenses needs no gradient, so it may run on a faster backend; attacks
        # always differentiate through the reference.
        self.backend = None
        if c.backend != "reference":
            from apudae_engine.backends.selection import get_backend

            self.backend = get_backend(c.backend, self.device)
        self.store: PartStore | None = None  # OUT/parts, from open_parts
        self._done: dict[str, tuple[list[Row], dict[str, Any]]] = {}  # part name -> rows, meta
        self._computed: set[str] = set()  # parts this process computed
        self._t_start = time.perf_counter()

    def _classifier_ref(self) -> str:
        c = self.config
        if c.classifier:
            return c.classifier
        source = classifier_source(c.model)
        if source is None:
            raise UserError(f"no classifier beside {c.model}; pass --classifier PATH")
        return str(source)

    def _inputs(self, row: str | AttackSpec, x: torch.Tensor, y: torch.Tensor, seed: int,
                purifier: Purifier | None):
        if row == "clean":
            return x, None
        if row == "noise":
            gen = torch.Generator().manual_seed(seed)
            u = torch.rand(x.shape, generator=gen).to(x.device) * 2 - 1
            return (x + self.config.eps * u).clamp(0, 1), None
        result = run_attack(replace(row, seed=seed), self.classifier, x, y, purifier)
        return result.images, result.budget

    @torch.no_grad()
    def _predict(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pur = self.defenses[name]
        if pur is not None and self.backend is not None:
            x = self.backend.purify(pur.dae, x, pur.mu, pur.sigma, pur.config).images
        elif pur is not None:
            with ieee_fp32_convolutions(x.device):  # scored as the engine runs it
                x = purify(pur.dae, x, pur.config, pur.mu, pur.sigma).images
        return self.classifier(x).argmax(1), x

    @torch.no_grad()
    def _held_out_correct(self, pur: Purifier, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per image, how many of ``draws`` held-out noise seeds (none seen by an attack)
        leave ``pur``'s prediction correct: (N,) int64."""
        count = torch.zeros(x.shape[0], dtype=torch.int64)
        for seed in held_out_seeds(self.config.draws):
            with ieee_fp32_convolutions(x.device):
                xp = purify(pur.dae, x, pur.config.with_(seed=seed), pur.mu, pur.sigma).images
            count += (self.classifier(xp).argmax(1) == y).cpu().to(torch.int64)
        return count

    def run_rows(self, rows: list[str | AttackSpec], count: int, batch: int, purifier,
                 title: str, table: str | None = None) -> list[Row]:
        """Craft each row's inputs for the first ``count`` images and score every defense.

        With ``table`` (after :meth:`open_parts`) each batch goes through the parts folder:
        batches already there are read, the others computed and written, and batches other
        workers hold are waited for. Without, everything is computed in memory.
        """
        job = _Table(table or "", rows, min(count, len(self.data)), batch, purifier, title)
        if table is None or self.store is None:
            return merge_rows([self._score_batch(job, *b) for b in self._batches(job)])
        self.compute([job])
        return self._collect(job)

    def _batches(self, t: _Table) -> list[tuple[int, int, int]]:
        """(index in the split, start, stop) of each batch of ``t``; start/stop in self.data."""
        first = self.config.offset // t.batch
        return [(first + b, start, min(start + t.batch, t.count))
                for b, start in enumerate(range(0, t.count, t.batch))]

    def _score_batch(self, t: _Table, g: int, start: int, stop: int,
                     heartbeat=None) -> list[Row]:
        """Every row of batch ``g`` (images ``start:stop``), scored on every defense."""
        c, t_start = self.config, time.perf_counter()
        out = [Row(row, "Linf" if row == "noise" else None, c.eps if row == "noise" else None)
               if isinstance(row, str) else Row(row.name, row.norm, row.eps) for row in t.rows]
        x = self.data.images[start:stop].to(self.device).float() / 255
        y = self.data.labels[start:stop].to(self.device)
        # g counts batches from the split's start: --offset runs and resumed runs give each
        # batch the seeds one run over the whole split would.
        seed = c.seed + _SEED_STRIDE * g
        for spec, acc in zip(t.rows, out, strict=True):
            t_row = t0 = time.perf_counter()
            adv, acc.budget = self._inputs(spec, x, y, seed, t.purifier)
            t_attack = acc.attack_seconds = time.perf_counter() - t0
            if acc.norm is not None:
                acc.norms.append(perturbation_norm(adv, x, acc.norm).cpu())
            with torch.no_grad():
                acc.errors.append(reconstruction_error(self.base.dae, adv).cpu())
            for name in self.defenses:
                t0 = time.perf_counter()
                pred, shown = self._predict(name, adv)
                acc.defense_seconds[name] = time.perf_counter() - t0
                acc.correct[name] = [(pred == y).cpu()]
                if start == 0 and name in ("none", c.aware_target):
                    acc.examples[name] = shown[:c.examples].cpu()
            if t.purifier is not None and c.draws:
                acc.draw_correct.append(self._held_out_correct(t.purifier, adv, y))
            if heartbeat is not None:
                heartbeat()
            # A line per row and batch: progress where no bar is shown (logs, CI).
            log.info("%s %s: images %d-%d of %d, attack %.1f s, scoring %.1f s "
                     "(%.0f s into the batch)", t.title, _row_name(acc), start + 1, stop,
                     t.count, t_attack, time.perf_counter() - t_row - t_attack,
                     time.perf_counter() - t_start)
        return out

    # Parts: resume and several workers (parts.py).

    def identity(self) -> dict[str, Any]:
        """What changes results, and so must agree for parts to be combined into one run.

        Left out: the image range (--limit, --offset, the sweep and aware limits), which only
        selects batches; the output folder, threads and ``examples``; and the device and
        scoring backend, which change results only within the engine's fp32 tolerances, so
        that a GPU machine may join a CPU run (each part records what scored it).
        """
        c = self.config
        return {
            "dae_sha256": self.base.checkpoint.weights_sha256,
            "classifier_sha256": self.classifier_ckpt.weights_sha256,
            "calibration": {"mu": self.base.mu, "sigma": self.base.sigma},
            "dataset": c.dataset, "split": c.split, "data_sha256": self.data_sha256,
            "eps_linf": c.eps, "eps_l2": c.eps_l2, "sweep": list(c.sweep),
            "attacks": list(c.attacks), "aware_attacks": list(c.aware_attacks),
            "defenses": list(c.defenses), "aware_target": c.aware_target, "seed": c.seed,
            "eot": c.eot, "draws": c.draws, "restarts": c.restarts, "steps": c.steps,
            "aware_steps": c.aware_steps, "square_queries": c.square_queries,
            "batch_size": c.batch_size, "aware_batch_size": c.aware_batch_size,
            "attack_specs": {a: asdict(c.attack_spec(a)) for a in (*c.attacks,
                                                                   *c.aware_attacks)},
            "purify_configs": {d: None if p is None else p.config.to_dict()
                               for d, p in self.defenses.items()},
            "aware_target_config": self.target.config.to_dict(),
        }

    def open_parts(self, fresh: bool = False) -> PartStore:
        """Use OUT/parts for this run's batches (``fresh``: delete it first)."""
        self.store = PartStore(Path(self.config.out_dir) / "parts", self.identity(), fresh)
        return self.store

    def _jobs(self) -> list[_Table]:
        """The tables of a run: oblivious, defense-aware (if any), the sweep's new eps."""
        c = self.config
        n = len(self.data)
        obl: list[str | AttackSpec] = ["clean", "noise", *(c.attack_spec(a) for a in c.attacks)]
        jobs = [_Table("oblivious", obl, n, c.batch_size, None, "oblivious")]
        if c.aware_attacks:
            rows = ["clean", *(c.attack_spec(a) for a in c.aware_attacks)]
            jobs.append(_Table("defense_aware", rows, min(c.aware_limit, n), c.aware_batch_size,
                               self.target, f"defense-aware (vs {c.aware_target})"))
        todo = self._sweep_todo()
        if todo:
            jobs.append(_Table("sweep", [c.attack_spec("pgd", e) for e in todo],
                               min(c.sweep_limit, n), c.batch_size, None, "eps sweep"))
        return jobs

    def _load(self, t: _Table, g: int, start: int, stop: int, name: str) -> bool:
        """Whether batch ``g``'s part is there, whole and of these rows (then cached)."""
        if name in self._done:
            return True
        got = self.store.read(name)
        if got is None:
            return False
        meta, arrays = got
        expected = {"table": t.key, "batch": g,
                    "images": [self.config.offset + start, self.config.offset + stop],
                    "row_names": [r if isinstance(r, str) else r.name for r in t.rows]}
        try:
            found = {k: meta.get(k) for k in expected}
            found["row_names"] = [r["name"] for r in meta["rows"]]
            if found != expected:
                raise ValueError(f"it holds {found}, expected {expected}")
            rows = rows_from_part(meta["rows"], arrays, stop - start)
            if any(list(r.correct) != list(self.defenses) for r in rows):
                raise ValueError("other defenses")
        except (KeyError, ValueError, TypeError) as exc:
            self.store.damaged(name, exc)
            return False
        self._done[name] = (rows, meta)
        return True

    def compute(self, jobs: list[_Table] | None = None, wait: bool = True) -> bool:
        """Compute the batches of ``jobs`` (default: the whole run) missing from the parts
        folder, taking each by a claim, then wait for those other workers hold.

        Returns whether every batch is done; False only without ``wait``, when other workers
        still hold batches (the last of them writes the report).
        """
        if self.store is None:
            self.open_parts()
        store, jobs = self.store, jobs if jobs is not None else self._jobs()
        t_start = time.perf_counter()
        for t in jobs:
            batches = self._batches(t)
            names = [store.name(t.key, g, stop - start, t.batch) for g, start, stop in batches]
            done = sum(self._load(t, *b, n) for b, n in zip(batches, names, strict=True))
            log.info("%s: %d rows x %d images x %d defenses, %d batches", t.title, len(t.rows),
                     t.count, len(self.defenses), len(batches))
            if done:
                log.info("%s: resuming: %d of %d batches already done in %s", t.title, done,
                         len(batches), store.folder)
        while True:
            for t in jobs:
                self._compute_table(t, t_start)
            missing = self._missing(jobs)
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

    def _missing(self, jobs: list[_Table]) -> list[str]:
        """Parts of ``jobs`` not in the folder yet (those that are get read)."""
        missing = []
        for t in jobs:
            for g, start, stop in self._batches(t):
                name = self.store.name(t.key, g, stop - start, t.batch)
                if not self._load(t, g, start, stop, name):
                    missing.append(name)
        return missing

    def _compute_table(self, t: _Table, t_start: float) -> None:
        """One pass over ``t``'s batches: compute each that is missing and can be claimed."""
        store, bar = self.store, None
        try:
            for g, start, stop in self._batches(t):
                name = store.name(t.key, g, stop - start, t.batch)
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
                    rows = self._score_batch(t, g, start, stop, lambda n=name: store.touch(n))
                    meta_rows, arrays = rows_to_part(rows)
                    meta = {"table": t.key, "batch": g,
                            "images": [self.config.offset + start, self.config.offset + stop],
                            "rows": meta_rows,
                            "scored_with": {"device": str(self.device),
                                            "backend": self.backend.name if self.backend
                                            else "reference"}}
                    store.write(name, meta, arrays)
                    self._done[name] = (rows, {**meta, "worker": store.worker})
                    self._computed.add(name)
                finally:
                    store.release(name)
                bar.update((stop - start) * len(t.rows))
                log.info("%s: batch %d (images %d-%d) written, %.0f s into this run", t.title,
                         g, self.config.offset + start + 1, self.config.offset + stop,
                         time.perf_counter() - t_start)
        finally:
            if bar is not None:
                bar.close()

    def _collect(self, t: _Table) -> list[Row]:
        """``t``'s rows over all its batches, from the parts, in batch order."""
        names = [self.store.name(t.key, g, stop - start, t.batch)
                 for g, start, stop in self._batches(t)]
        return merge_rows([self._done[n][0] for n in names])

    def summarize(self, rows: list[Row], clean_errors: torch.Tensor | None) -> dict[str, Any]:
        mu = self.base.mu
        threshold = self.base.flag_threshold()
        table = {}
        for row in rows:
            correct, r, norms = row.cat()
            entry = {
                "n": int(r.numel()),
                "accuracy": {d: round(v.float().mean().item(), 4) for d, v in correct.items()},
                "reconstruction_error": {"mean": r.mean().item(), "median": r.median().item(),
                                         "above_mu": (r > mu).float().mean().item(),
                                         "flagged": (r > threshold).float().mean().item()},
                "detection_auc": None if row.name == "clean" or clean_errors is None
                else round(roc_auc(clean_errors[:r.numel()], r), 4),
                "perturbation": None if norms is None else {
                    "norm": row.norm, "eps": row.eps, "max": norms.max().item(),
                    "mean": norms.mean().item()},
                "budget": None if row.budget is None else row.budget.to_dict(),
                "attack_seconds": round(row.attack_seconds, 2),
                "defense_seconds": {d: round(s, 2) for d, s in row.defense_seconds.items()},
            }
            if row.draw_correct:
                entry["draws"] = _draw_summary(torch.cat(row.draw_correct), self.config.draws)
            table[row.name] = entry
            log.info("%-10s accuracy %s", row.name, ", ".join(
                f"{d} {a:.2%}" for d, a in entry["accuracy"].items()))
        worst = _worst_case(rows, self.config.draws)
        if worst is not None:
            table[WORST_CASE] = worst
        return table

    def run(self, wait: bool = True) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """All tables; returns (results for JSON, raw arrays for plots).

        The batches go through the parts folder (:meth:`compute`), and the tables are built
        from the parts, so a resumed or shared run gives the numbers of one uninterrupted
        run. None when ``wait`` is False and other workers still hold batches.
        """
        if self.store is None:
            self.open_parts()
        jobs = self._jobs()
        if self._missing(jobs) and not self.compute(jobs, wait):
            return None
        raw = {t.key: self._collect(t) for t in jobs}
        obl = raw["oblivious"]
        clean_r = obl[0].cat()[1]
        tables = {"oblivious": self.summarize(obl, clean_r)}
        if "defense_aware" in raw:
            tables["defense_aware"] = self.summarize(raw["defense_aware"], clean_r)
        tables["sweep"] = self._sweep(obl, raw.pop("sweep", []))
        settings = self._settings()
        settings["parts"] = self._parts_settings(jobs)
        settings["wall_seconds"] = round(time.perf_counter() - self._t_start, 1)
        return {"settings": settings, **tables}, raw

    def _parts_settings(self, jobs: list[_Table]) -> dict[str, Any]:
        """Which parts the tables came from: count, workers, attack time summed over parts."""
        metas = [self._done[self.store.name(t.key, g, stop - start, t.batch)][1]
                 for t in jobs for g, start, stop in self._batches(t)]
        workers = {(m["worker"]["host"], m["worker"]["pid"]) for m in metas}
        scored = {(m["scored_with"]["device"], m["scored_with"]["backend"]) for m in metas}
        if len(scored) > 1:
            log.warning("the parts were scored on several devices or backends: %s",
                        ", ".join(f"{d} {b}" for d, b in sorted(scored)))
        return {"folder": str(self.store.folder), "used": len(metas),
                "computed_by_this_process": len(self._computed),
                "workers": [{"host": h, "pid": p} for h, p in sorted(workers)],
                "scored_with": [{"device": d, "backend": b} for d, b in sorted(scored)],
                "attack_seconds": round(sum(r["attack_seconds"] for m in metas
                                            for r in m["rows"]), 2)}

    def _sweep_todo(self) -> list[float]:
        """Sweep eps values the oblivious PGD row does not already give."""
        c = self.config
        reuse = "pgd" in c.attacks
        return [e for e in c.sweep if not (reuse and abs(e - c.eps) < 1e-12)]

    def _sweep(self, obl: list[Row], rows: list[Row]) -> dict[str, Any]:
        """PGD L-inf accuracy per defense at eps = 0 and each sweep value."""
        c = self.config
        count = min(c.sweep_limit, len(self.data))
        by_name = {r.name: r for r in obl}
        acc: dict[float, dict[str, float]] = {0.0: _accuracy(by_name["clean"], count)}
        for eps, row in zip(self._sweep_todo(), rows, strict=True):
            acc[eps] = _accuracy(row, count)
        for eps in c.sweep:
            if eps not in acc:
                acc[eps] = _accuracy(by_name["pgd"], count)
        eps_sorted = sorted(acc)
        return {"attack": "pgd", "norm": "Linf", "n": count, "eps": eps_sorted,
                "steps": c.attack_spec("pgd").steps,
                "accuracy": {d: [acc[e][d] for e in eps_sorted] for d in self.defenses}}

    def _settings(self) -> dict[str, Any]:
        c = self.config
        specs = {a: asdict(c.attack_spec(a)) for a in (*c.attacks, *c.aware_attacks)}
        for name, spec in specs.items():
            spec["norm"] = c.attack_spec(name).norm
            spec["step_size"] = c.attack_spec(name).step_size
        return {
            "command": c.command, "engine": __version__, "torch": torch.__version__,
            "dataset": c.dataset, "split": c.split, "data": self.data.source, "n": len(self.data),
            "aware_n": min(c.aware_limit, len(self.data)) if c.aware_attacks else 0,
            "quick": c.quick, "seed": c.seed, "attack_seed": f"seed + {_SEED_STRIDE} * batch index",
            "offset": c.offset,
            "defense_backend": self.backend.name if self.backend else "reference",
            "eps_linf": c.eps, "eps_l2": c.eps_l2,
            "eot": c.eot, "draws": c.draws, "held_out_seeds": held_out_seeds(c.draws),
            "restarts": c.restarts, "batch_size": c.batch_size,
            "aware_batch_size": c.aware_batch_size,
            "aware_target": c.aware_target, "attacks": specs,
            "defenses": {d: (None if p is None else p.config.to_dict())
                         for d, p in self.defenses.items()},
            "dae": {"path": str(self.base.checkpoint.path),
                    "sha256": self.base.checkpoint.weights_sha256,
                    "arch": self.base.checkpoint.meta.get("arch"),
                    "config": self.base.checkpoint.meta.get("config")},
            "classifier": {"path": str(self.classifier_ckpt.path),
                           "sha256": self.classifier_ckpt.weights_sha256},
            "calibration": {"mu": self.base.mu, "sigma": self.base.sigma,
                            "data": (self.base.checkpoint.calibration or {}).get("data"),
                            "flag_threshold": self.base.flag_threshold(),
                            "flag_rule": flag_rule(self.base)},
            "hardware": _hardware(self.device),
        }


def flag_rule(purifier: Purifier) -> str:
    """How the flag threshold was set, for the report (``method.detection``)."""
    c, cal = purifier.config, purifier.checkpoint.calibration or {}
    if c.flag_k is not None or not cal.get("fpr_thresholds"):
        k = 3.0 if c.flag_k is None else c.flag_k
        return f"mu + {k:g} sigma"
    fpr = c.flag_fpr if c.flag_fpr is not None else cal.get("flag_fpr", 0.05)
    return f"{100 * fpr:g} % false positives on the clean calibration split"


def _hardware(device: torch.device) -> dict[str, Any]:
    return describe(device)  # taken at the end: the load says how contended the run was


def _worst_case(rows: list[Row], draws: int = 0) -> dict[str, Any] | None:
    """Per-image worst case over the L-inf attack rows: correct only if every attack failed."""
    attacked = [r for r in rows if r.budget is not None and r.norm == "Linf"]
    if len(attacked) < 2:
        return None
    correct = [r.cat()[0] for r in attacked]
    acc = {d: round(torch.stack([c[d] for c in correct]).all(dim=0).float().mean().item(), 4)
           for d in correct[0]}
    log.info("%-10s accuracy %s", WORST_CASE, ", ".join(f"{d} {a:.2%}" for d, a in acc.items()))
    out = {"n": int(correct[0][next(iter(acc))].numel()), "accuracy": acc,
           "over": [r.name for r in attacked], "reconstruction_error": None,
           "detection_auc": None, "perturbation": None, "budget": None}
    if draws and all(r.draw_correct for r in attacked):
        counts = torch.stack([torch.cat(r.draw_correct) for r in attacked]).amin(dim=0)
        out["draws"] = _draw_summary(counts, draws)
    return out


def _draw_summary(counts: torch.Tensor, k: int) -> dict[str, Any]:
    """Robust accuracy of a randomized defense from per-image correct counts over k held-out
    draws: the mean over the draws and the share correct on all k."""
    return {"k": k, "seeds": held_out_seeds(k),
            "mean": round((counts.double() / k).mean().item(), 4),
            "all": round((counts == k).double().mean().item(), 4)}


def _row_name(row: Row) -> str:
    """A row's name with its threat model, for progress lines (``pgd (Linf 0.05)``)."""
    return row.name if row.eps is None or row.name == "noise" else (
        f"{row.name} ({row.norm} {row.eps:.3g})")


def _accuracy(row: Row, count: int) -> dict[str, float]:
    correct, _, _ = row.cat()
    return {d: round(v[:count].float().mean().item(), 4) for d, v in correct.items()}


def _images_sha256(images: torch.Tensor, labels: torch.Tensor) -> str:
    h = hashlib.sha256(images.contiguous().numpy().tobytes())
    h.update(labels.contiguous().numpy().tobytes())
    return h.hexdigest()


REPORT_CLAIM = "report"  # claim name of the worker writing the final report


def evaluate(config: EvalConfig, fresh: bool = False, wait: bool = True) -> dict[str, Any] | None:
    """Run an evaluation and write results.json, results.md and plots to ``config.out_dir``.

    Batches are kept in ``out_dir/parts``: rerunning the same call resumes, and calls in
    several processes share the batches (see :mod:`.parts`). ``fresh`` deletes the parts
    first. Returns the results, or None when another worker writes them (without ``wait``,
    batches other workers hold were left to them; or another worker took the report).
    """
    from apudae_engine.evaluation.report import write_report

    evaluator = Evaluator(config)
    store = evaluator.open_parts(fresh)
    if not evaluator.compute(wait=wait):
        return None
    if not store.claim(REPORT_CLAIM):
        log.info("every batch is done; %s writes the report",
                 ", ".join(store.holders([REPORT_CLAIM])) or "another worker")
        return None
    try:
        results, raw = evaluator.run()
        write_report(results, raw, evaluator.base, Path(evaluator.config.out_dir))
    finally:
        store.release(REPORT_CLAIM)
    return results
