"""Robustness evaluation: accuracy of each defense under each attack, and detection by r(x).

Rows are inputs (clean, uniform noise, each attack); columns are defenses (no defense, direct
DAE, iterative, adaptive with the corrected defaults, adaptive as the authors' code runs it).
Two tables are kept apart: *oblivious* attacks crafted on the bare classifier (the authors'
setting) and *defense-aware* attacks crafted against one purifier (``aware_target``). A PGD
sweep over epsilon feeds the accuracy-vs-eps plot. ``config`` holds the settings,
``report`` writes results.json, results.md and the plots.

This module loads the models and data, sets up the defenses and lists a run's tables;
``scoring`` crafts and scores one batch. Each batch of each table is written to OUT/parts as
soon as it is scored (``schedule`` says which batches to compute, ``parts`` keeps them, in the
form of ``outcomes``), and the tables are always built from those parts: a killed run resumes
at its first missing batch, several processes share one run by claiming batches, and either
way the numbers are those of one uninterrupted run. ``tables`` summarises the rows.

Example::

    results = evaluate(EvalConfig(model="fmnist", dataset="fashion-mnist", quick=True,
                                  out_dir="runs/eval-quick"))
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from apudae_engine import Purifier, __version__
from apudae_engine.core.errors import UserError
from apudae_engine.core.host import describe, resolve_device
from apudae_engine.evaluation.attacks import AttackSpec
from apudae_engine.evaluation.attacks.aware import held_out_seeds
from apudae_engine.evaluation.aware_sweep import aware_key, summarize_curves
from apudae_engine.evaluation.config import DEFENSES, EvalConfig
from apudae_engine.evaluation.outcomes import Row
from apudae_engine.evaluation.parts import PartStore
from apudae_engine.evaluation.schedule import Scheduler, Table
from apudae_engine.evaluation.scoring import SEED_STRIDE, BatchScorer
from apudae_engine.evaluation.tables import (
    WORST_CASE,
    flag_rule,
    roc_auc,
    summarize,
    sweep_table,
    sweep_todo,
)
from apudae_engine.evaluation.targets import NoDefense, defense_configs
from apudae_engine.images.datasets import load_dataset
from apudae_engine.method.checkpoint import classifier_source, load_checkpoint

# WORST_CASE, flag_rule and roc_auc live in ``tables``; they are imported from here too.
__all__ = ["REPORT_CLAIM", "WORST_CASE", "Evaluator", "evaluate", "flag_rule", "roc_auc"]

log = logging.getLogger(__name__)


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
        # The defenses as purify runs them: the model's tuned settings (apudae-engine tune)
        # unless --method-defaults; compat always keeps the authors' own.
        self.configs = configs = defense_configs(
            c.seed, self.base.checkpoint.purify_defaults, c.method_defaults)
        dae, mu, sigma = self.base.dae, self.base.mu, self.base.sigma
        # Scoring the defenses needs no gradient, so it may run on a faster backend; attacks
        # (the targets) always differentiate through the reference. Targets carry the
        # checkpoint: the detector-aware attack reads its flag threshold.
        self.defenses: dict[str, Purifier | None] = {
            d: None if d == "none" else Purifier(dae, mu, sigma, configs[d], backend=c.backend)
            for d in c.defenses}
        ckpt = self.base.checkpoint
        self.targets: dict[str, Purifier] = {
            d: NoDefense(dae, mu, sigma, c.seed, ckpt) if d == "none"
            else Purifier(dae, mu, sigma, configs[d], checkpoint=ckpt)
            for d in dict.fromkeys((c.aware_target, *c.aware_targets))}
        self.target = self.targets[c.aware_target]
        # What scores the defenses (auto resolved); an unusable --backend raises here.
        self.defense_backend = "reference" if c.backend == "reference" else Purifier(
            dae, mu, sigma, configs["adaptive"], backend=c.backend).backend_report(
                self.device)["backend"]
        self.scorer = BatchScorer(c, self.classifier, self.base, self.defenses)
        self.store: PartStore | None = None  # OUT/parts, from open_parts
        self.scheduler: Scheduler | None = None  # its batches, from open_parts
        self._t_start = time.perf_counter()

    def _classifier_ref(self) -> str:
        c = self.config
        if c.classifier:
            return c.classifier
        source = classifier_source(c.model)
        if source is None:
            raise UserError(f"no classifier beside {c.model}; pass --classifier PATH")
        return str(source)

    def _score_batch(self, t: Table, g: int, start: int, stop: int,
                     heartbeat=None) -> list[Row]:
        """Every row of batch ``g`` (images ``start:stop``), scored on every defense."""
        x = self.data.images[start:stop].to(self.device).float() / 255
        y = self.data.labels[start:stop].to(self.device)
        return self.scorer.score(t, g, start, stop, x, y, heartbeat)

    # Parts: resume and several workers (schedule.py, parts.py).

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
            # What the detector-aware attack keeps r under (the deployment's threshold).
            **({"flag_threshold": self.base.flag_threshold()}
               if "apgd-detector" in c.aware_attacks else {}),
            # The curve's tables are keyed by target and eps, so --aware-sweep and
            # --aware-targets only select tables (runs over parts of a curve share a folder).
            **({"aware_sweep_targets": {d: None if d == "none" else self.configs[d].to_dict()
                                        for d in DEFENSES}} if c.aware_sweep else {}),
        }

    def open_parts(self, fresh: bool = False) -> PartStore:
        """Use OUT/parts for this run's batches (``fresh``: delete it first)."""
        self.store = PartStore(Path(self.config.out_dir) / "parts", self.identity(), fresh)
        scored_with = {"device": str(self.device), "backend": self.defense_backend}
        self.scheduler = Scheduler(self.store, self.config.offset, list(self.defenses),
                                   scored_with)
        return self.store

    def _jobs(self) -> list[Table]:
        """The tables of a run: oblivious, defense-aware (if any), the sweep's new eps."""
        c = self.config
        n = len(self.data)
        obl: list[str | AttackSpec] = ["clean", "noise", *(c.attack_spec(a) for a in c.attacks)]
        jobs = [Table("oblivious", obl, n, c.batch_size, None, "oblivious")]
        if c.aware_attacks and not c.aware_sweep:  # the curve's tables replace this one
            rows = ["clean", *(c.attack_spec(a) for a in c.aware_attacks)]
            jobs.append(Table("defense_aware", rows, min(c.aware_limit, n), c.aware_batch_size,
                              self.target, f"defense-aware (vs {c.aware_target})"))
        # Target by target, in the order given (a partial run then holds whole curves).
        for target in c.aware_targets:
            for eps in c.aware_sweep:
                jobs.append(Table(aware_key(target, eps),
                                  [c.attack_spec(a, eps) for a in c.aware_attacks],
                                  min(c.aware_limit, n), c.aware_batch_size,
                                  self.targets[target],
                                  f"defense-aware vs {target}, L∞ {eps:g}"))
        todo = sweep_todo(c)
        if todo:
            jobs.append(Table("sweep", [c.attack_spec("pgd", e) for e in todo],
                              min(c.sweep_limit, n), c.batch_size, None, "eps sweep"))
        return jobs

    def compute(self, jobs: list[Table] | None = None, wait: bool = True) -> bool:
        """Compute the batches of ``jobs`` (default: the whole run) missing from the parts
        folder, taking each by a claim, then wait for those other workers hold.

        Returns whether every batch is done; False only without ``wait``, when other workers
        still hold batches (the last of them writes the report).
        """
        if self.store is None:
            self.open_parts()
        jobs = jobs if jobs is not None else self._jobs()
        t_start = time.perf_counter()
        for t in jobs:
            n, done = len(t.batches(self.config.offset)), self.scheduler.done(t)
            log.info("%s: %d rows x %d images x %d defenses, %d batches", t.title, len(t.rows),
                     t.count, len(self.defenses), n)
            if done:
                log.info("%s: resuming: %d of %d batches already done in %s", t.title, done, n,
                         self.store.folder)
        return self.scheduler.compute(jobs, self._score_batch, wait, t_start)

    def summarize(self, rows: list[Row], clean_errors: torch.Tensor | None) -> dict[str, Any]:
        """One table's entries (``tables.summarize``) with this run's calibration and draws."""
        return summarize(rows, clean_errors, self.base, self.config.draws)

    def run(self, wait: bool = True) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """All tables; returns (results for JSON, raw arrays for plots).

        The batches go through the parts folder (:meth:`compute`), and the tables are built
        from the parts, so a resumed or shared run gives the numbers of one uninterrupted
        run. None when ``wait`` is False and other workers still hold batches.
        """
        if self.store is None:
            self.open_parts()
        c, jobs = self.config, self._jobs()
        if self.scheduler.missing(jobs) and not self.compute(jobs, wait):
            return None
        raw = {t.key: self.scheduler.rows(t) for t in jobs}
        obl = raw["oblivious"]
        clean_r = obl[0].cat()[1]
        tables = {"oblivious": self.summarize(obl, clean_r)}
        if "defense_aware" in raw:
            tables["defense_aware"] = self.summarize(raw["defense_aware"], clean_r)
        if c.aware_sweep:
            points = {t.key: self.summarize(raw[t.key], clean_r) for t in jobs
                      if t.key.startswith("aware-")}
            tables["aware_sweep"] = {**summarize_curves(c, points, tables["oblivious"]["clean"]),
                                     "tables": points}
        tables["sweep"] = sweep_table(self.config, obl, raw.pop("sweep", []), len(self.data),
                                      list(self.defenses))
        settings = self._settings()
        settings["parts"] = self.scheduler.summary(jobs)
        settings["wall_seconds"] = round(time.perf_counter() - self._t_start, 1)
        return {"settings": settings, **tables}, raw

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
            "quick": c.quick, "seed": c.seed, "attack_seed": f"seed + {SEED_STRIDE} * batch index",
            "offset": c.offset,
            "defense_backend": self.defense_backend,
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


def _hardware(device: torch.device) -> dict[str, Any]:
    return describe(device)  # taken at the end: the load says how contended the run was


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
