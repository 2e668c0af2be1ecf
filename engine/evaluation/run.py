"""Robustness evaluation: accuracy of each defense under each attack, and detection by r(x).

Rows are inputs (clean, uniform noise, each attack); columns are defenses (no defense, direct
DAE, iterative, adaptive with the corrected defaults, adaptive as the authors' code runs it).
Two tables are kept apart: *oblivious* attacks crafted on the bare classifier (the authors'
setting) and *defense-aware* attacks crafted against one purifier (``aware_target``). A PGD
sweep over epsilon feeds the accuracy-vs-eps plot. ``eval_config`` holds the settings,
``eval_report`` writes results.json, results.md and the plots.

Example::

    results = evaluate(EvalConfig(model="fmnist", dataset="fashion-mnist", quick=True,
                                  out_dir="runs/eval-quick"))
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from apudae_engine._version import __version__
from apudae_engine.backends.purifier import Purifier
from apudae_engine.core.errors import UserError
from apudae_engine.core.host import describe, resolve_device
from apudae_engine.core.numerics import ieee_fp32_convolutions
from apudae_engine.core.progress import progress
from apudae_engine.evaluation.attacks import AttackBudget, AttackSpec, perturbation_norm, run_attack
from apudae_engine.evaluation.attacks.aware import held_out_seeds
from apudae_engine.evaluation.config import EvalConfig
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
class _Row:
    """Per-image outcomes of one input row, accumulated over batches."""

    name: str
    norm: str | None = None
    eps: float | None = None
    correct: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    errors: list[torch.Tensor] = field(default_factory=list)
    norms: list[torch.Tensor] = field(default_factory=list)
    budget: AttackBudget | None = None
    attack_seconds: float = 0.0
    defense_seconds: dict[str, float] = field(default_factory=dict)
    examples: dict[str, torch.Tensor] = field(default_factory=dict)
    # Defense-aware rows: per image, held-out noise draws of the target classified correctly.
    draw_correct: list[torch.Tensor] = field(default_factory=list)

    def cat(self) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        correct = {d: torch.cat(v) for d, v in self.correct.items()}
        return correct, torch.cat(self.errors), torch.cat(self.norms) if self.norms else None


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
        self.data = load_dataset(c.dataset, c.split, c.data_dir,
                                 self.base.checkpoint.input_shape).subset(c.limit, c.offset)
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
                 title: str) -> list[_Row]:
        """Craft each row's inputs for the first ``count`` images and score every defense."""
        c, out = self.config, []
        for row in rows:
            if isinstance(row, str):
                out.append(_Row(row, "Linf" if row == "noise" else None,
                                c.eps if row == "noise" else None))
            else:
                out.append(_Row(row.name, row.norm, row.eps))
        count = min(count, len(self.data))
        bar = progress(total=count * len(rows), desc=title, unit="img")
        log.info("%s: %d rows x %d images x %d defenses", title, len(rows), count,
                 len(self.defenses))
        t_start = time.perf_counter()
        try:
            for b, start in enumerate(range(0, count, batch)):
                stop = min(start + batch, count)
                x = self.data.images[start:stop].to(self.device).float() / 255
                y = self.data.labels[start:stop].to(self.device)
                for spec, acc in zip(rows, out, strict=True):
                    bar.set_postfix(row=_row_name(acc))
                    t_row = t0 = time.perf_counter()
                    # b counts batches from the split's start: --offset runs get the seeds
                    # one run over the whole split would.
                    seed = c.seed + _SEED_STRIDE * (b + c.offset // batch)
                    adv, budget = self._inputs(spec, x, y, seed, purifier)
                    t_attack = time.perf_counter() - t0
                    acc.attack_seconds += t_attack
                    if budget is not None:
                        acc.budget = budget if acc.budget is None else acc.budget.merge(budget)
                    if acc.norm is not None:
                        acc.norms.append(perturbation_norm(adv, x, acc.norm).cpu())
                    with torch.no_grad():
                        acc.errors.append(reconstruction_error(self.base.dae, adv).cpu())
                    for name in self.defenses:
                        t0 = time.perf_counter()
                        pred, shown = self._predict(name, adv)
                        acc.defense_seconds[name] = (acc.defense_seconds.get(name, 0.0)
                                                     + time.perf_counter() - t0)
                        acc.correct.setdefault(name, []).append((pred == y).cpu())
                        if b == 0 and name in ("none", c.aware_target):
                            acc.examples[name] = shown[:c.examples].cpu()
                    if purifier is not None and c.draws:
                        acc.draw_correct.append(self._held_out_correct(purifier, adv, y))
                    bar.update(x.shape[0])
                    # A line per row and batch: progress where no bar is shown (logs, CI).
                    log.info("%s %s: images %d-%d of %d, attack %.1f s, scoring %.1f s "
                             "(%.0f s into %s)", title, _row_name(acc), start + 1, stop, count,
                             t_attack, time.perf_counter() - t_row - t_attack,
                             time.perf_counter() - t_start, title)
        finally:
            bar.close()
        return out

    def summarize(self, rows: list[_Row], clean_errors: torch.Tensor | None) -> dict[str, Any]:
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

    def run(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """All tables; returns (results for JSON, raw arrays for plots)."""
        c, t_start = self.config, time.perf_counter()
        n = len(self.data)
        oblivious_rows: list[str | AttackSpec] = ["clean", "noise"]
        oblivious_rows += [c.attack_spec(a) for a in c.attacks]
        obl = self.run_rows(oblivious_rows, n, c.batch_size, None, "oblivious")
        clean_r = obl[0].cat()[1]
        tables = {"oblivious": self.summarize(obl, clean_r)}
        raw = {"oblivious": obl}
        if c.aware_attacks:
            rows = ["clean"] + [c.attack_spec(a) for a in c.aware_attacks]
            aware = self.run_rows(rows, c.aware_limit, c.aware_batch_size, self.target,
                                  f"defense-aware (vs {c.aware_target})")
            tables["defense_aware"] = self.summarize(aware, clean_r)
            raw["defense_aware"] = aware
        tables["sweep"] = self._sweep(obl)
        settings = self._settings()
        settings["wall_seconds"] = round(time.perf_counter() - t_start, 1)
        return {"settings": settings, **tables}, raw

    def _sweep(self, obl: list[_Row]) -> dict[str, Any]:
        """PGD L-inf accuracy per defense at eps = 0 and each sweep value."""
        c = self.config
        count = min(c.sweep_limit, len(self.data))
        by_name = {r.name: r for r in obl}
        acc: dict[float, dict[str, float]] = {0.0: _accuracy(by_name["clean"], count)}
        todo = []
        for eps in c.sweep:
            if "pgd" in by_name and abs(eps - c.eps) < 1e-12:
                acc[eps] = _accuracy(by_name["pgd"], count)
            else:
                todo.append(eps)
        if todo:
            rows = self.run_rows([c.attack_spec("pgd", e) for e in todo], count, c.batch_size,
                                 None, "eps sweep")
            for eps, row in zip(todo, rows, strict=True):
                acc[eps] = _accuracy(row, count)
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


def _worst_case(rows: list[_Row], draws: int = 0) -> dict[str, Any] | None:
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


def _row_name(row: _Row) -> str:
    """A row's name with its threat model, for progress lines (``pgd (Linf 0.05)``)."""
    return row.name if row.eps is None or row.name == "noise" else (
        f"{row.name} ({row.norm} {row.eps:.3g})")


def _accuracy(row: _Row, count: int) -> dict[str, float]:
    correct, _, _ = row.cat()
    return {d: round(v[:count].float().mean().item(), 4) for d, v in correct.items()}


def evaluate(config: EvalConfig) -> dict[str, Any]:
    """Run an evaluation and write results.json, results.md and plots to ``config.out_dir``."""
    from apudae_engine.evaluation.report import write_report

    evaluator = Evaluator(config)
    results, raw = evaluator.run()
    write_report(results, raw, evaluator.base, Path(evaluator.config.out_dir))
    return results
