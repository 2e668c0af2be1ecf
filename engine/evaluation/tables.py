"""An evaluation's result tables, summarised from its per-image rows.

:func:`summarize` turns one table's rows (``outcomes``) into results.json's entries: accuracy
per defense, reconstruction error and detection AUC, perturbation, attack budget and held-out
draws, plus the per-image worst case over the L-inf attacks (``WORST_CASE``).
:func:`sweep_table` gives the PGD accuracy-vs-eps curve. ``run`` computes the rows; this only
reads them.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from apudae_engine import Purifier
from apudae_engine.evaluation.attacks.aware import held_out_seeds
from apudae_engine.evaluation.config import EvalConfig
from apudae_engine.evaluation.outcomes import Row

log = logging.getLogger(__name__)

WORST_CASE = "worst-case"  # table key of the per-image worst case over the L-inf attacks


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


def summarize(rows: list[Row], clean_errors: torch.Tensor | None, base: Purifier,
              draws: int) -> dict[str, Any]:
    """One table's entries by row name, and its ``WORST_CASE`` when it has two L-inf attacks.

    ``clean_errors``: reconstruction errors of the clean images, for the detection AUC (None
    leaves it out); ``base``: the calibrated purifier whose mu and flag threshold apply;
    ``draws``: held-out noise draws per image of the defense-aware rows.
    """
    mu = base.mu
    threshold = base.flag_threshold()
    table = {}
    for row in rows:
        correct, r, norms = row.cat()
        flagged = r > threshold
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
            "attack_cpu_seconds": round(row.attack_cpu_seconds, 2),
            "defense_seconds": {d: round(s, 2) for d, s in row.defense_seconds.items()},
        }
        if row.draw_correct:
            entry["draws"] = _draw_summary(torch.cat(row.draw_correct), draws)
        entry["rejection"] = _rejection(row, correct, flagged, draws)
        table[row.name] = entry
        log.info("%-10s accuracy %s", row.name, ", ".join(
            f"{d} {a:.2%}" for d, a in entry["accuracy"].items()))
    worst = _worst_case(rows, draws, threshold)
    if worst is not None:
        table[WORST_CASE] = worst
    return table


def _rejection(row: Row, correct: dict[str, torch.Tensor], flagged: torch.Tensor,
               draws: int) -> dict[str, Any]:
    """The detect-and-reject system on one row: a flagged input is rejected. Clean row: the
    rejection (false-positive) rate and accuracy on the accepted images; attack rows:
    accuracy with rejection (correct or flagged), on the defense's seed and on held-out draws."""
    n = max(flagged.numel(), 1)
    if row.name == "clean":
        kept = ~flagged
        return {"rejected": round(flagged.float().mean().item(), 4),
                "accepted_n": int(kept.sum()),
                "accepted_accuracy": {d: round(v[kept].float().mean().item(), 4)
                                      if kept.any() else None for d, v in correct.items()}}
    out: dict[str, Any] = {"flagged": round(flagged.float().mean().item(), 4),
                           "accuracy": {d: round((v | flagged).float().sum().item() / n, 4)
                                        for d, v in correct.items()}}
    if row.draw_correct and draws:
        counts = torch.cat(row.draw_correct)
        out["draws"] = _draw_summary(torch.where(flagged, draws, counts), draws)
    return out


def _worst_case(rows: list[Row], draws: int = 0,
                threshold: float | None = None) -> dict[str, Any] | None:
    """Per-image worst case over the L-inf attack rows: correct only if every attack failed
    (with rejection: only if each attack's image was flagged or classified correctly)."""
    attacked = [r for r in rows if r.budget is not None and r.norm == "Linf"]
    if len(attacked) < 2:
        return None
    cats = [r.cat() for r in attacked]
    correct = [c for c, _, _ in cats]
    acc = {d: round(torch.stack([c[d] for c in correct]).all(dim=0).float().mean().item(), 4)
           for d in correct[0]}
    log.info("%-10s accuracy %s", WORST_CASE, ", ".join(f"{d} {a:.2%}" for d, a in acc.items()))
    out = {"n": int(correct[0][next(iter(acc))].numel()), "accuracy": acc,
           "over": [r.name for r in attacked], "reconstruction_error": None,
           "detection_auc": None, "perturbation": None, "budget": None}
    if draws and all(r.draw_correct for r in attacked):
        counts = torch.stack([torch.cat(r.draw_correct) for r in attacked]).amin(dim=0)
        out["draws"] = _draw_summary(counts, draws)
    if threshold is not None:
        flagged = [r > threshold for _, r, _ in cats]
        out["rejection"] = {"flagged": None, "accuracy": {d: round(torch.stack(
            [c[d] | f for c, f in zip(correct, flagged)]).all(dim=0).float().mean().item(), 4)
            for d in correct[0]}}
        if "draws" in out:
            counts = torch.stack([torch.where(f, draws, torch.cat(r.draw_correct))
                                  for r, f in zip(attacked, flagged)]).amin(dim=0)
            out["rejection"]["draws"] = _draw_summary(counts, draws)
    return out


def _draw_summary(counts: torch.Tensor, k: int) -> dict[str, Any]:
    """Robust accuracy of a randomized defense from per-image correct counts over k held-out
    draws: the mean over the draws and the share correct on all k."""
    n = counts.numel()
    mean, every = (counts.double() / k).mean().item(), (counts == k).double().mean().item()
    # A per-image share in [0, 1] varies at most as a 0/1 outcome with its mean: the Wilson
    # interval of the mean is conservative (and not empty where every image agrees).
    return {"k": k, "seeds": held_out_seeds(k), "mean": round(mean, 4),
            "all": round(every, 4), "ci95": {"mean": wilson(mean, n), "all": wilson(every, n)}}


def wilson(p: float, n: int, z: float = 1.96) -> list[float]:
    """Wilson score interval (95 % by default) of a share ``p`` measured on ``n`` images."""
    if n <= 0:
        return [0.0, 1.0]
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(centre - half, 0.0), 4), round(min(centre + half, 1.0), 4)]


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value (the sign test) for ``b`` and ``c`` discordant pairs:
    images only one of two defenses gets right, and only the other."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def sweep_todo(config: EvalConfig) -> list[float]:
    """Sweep eps values the oblivious PGD row does not already give."""
    c = config
    reuse = "pgd" in c.attacks
    return [e for e in c.sweep if not (reuse and abs(e - c.eps) < 1e-12)]


def sweep_table(config: EvalConfig, obl: list[Row], rows: list[Row], n_images: int,
                defenses: list[str]) -> dict[str, Any]:
    """PGD L-inf accuracy per defense at eps = 0 and each sweep value.

    ``obl``: the oblivious table's rows; ``rows``: the sweep's, one per :func:`sweep_todo`
    value; ``n_images``: the images evaluated (the sweep covers the first ``sweep_limit``).
    """
    c = config
    count = min(c.sweep_limit, n_images)
    by_name = {r.name: r for r in obl}
    acc: dict[float, dict[str, float]] = {0.0: _accuracy(by_name["clean"], count)}
    for eps, row in zip(sweep_todo(c), rows, strict=True):
        acc[eps] = _accuracy(row, count)
    for eps in c.sweep:
        if eps not in acc:
            acc[eps] = _accuracy(by_name["pgd"], count)
    eps_sorted = sorted(acc)
    return {"attack": "pgd", "norm": "Linf", "n": count, "eps": eps_sorted,
            "steps": c.attack_spec("pgd").steps,
            "accuracy": {d: [acc[e][d] for e in eps_sorted] for d in defenses}}


def _accuracy(row: Row, count: int) -> dict[str, float]:
    correct, _, _ = row.cat()
    return {d: round(v[:count].float().mean().item(), 4) for d, v in correct.items()}


def flag_rule(purifier: Purifier) -> str:
    """How the flag threshold was set, for the report (``method.detection``)."""
    c, cal = purifier.config, purifier.checkpoint.calibration or {}
    if c.flag_k is not None or not cal.get("fpr_thresholds"):
        k = 3.0 if c.flag_k is None else c.flag_k
        return f"mu + {k:g} sigma"
    fpr = c.flag_fpr if c.flag_fpr is not None else cal.get("flag_fpr", 0.05)
    return f"{100 * fpr:g} % false positives on the clean calibration split"
