"""Scoring one batch of an evaluation: each row's inputs crafted, every defense scored on them.

A row is the clean images, uniform noise or an attack (on the bare classifier, or through a
purifier for the defense-aware table). Each defense purifies the row's inputs and the
classifier labels them; the per-image outcomes go into a :class:`Row` (``outcomes``). A
batch's seeds depend only on its index in the split (``SEED_STRIDE``), so a batch scores the
same whichever run, worker or --offset computes it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import torch

from apudae_engine import Purifier
from apudae_engine.evaluation.attacks import AttackSpec, perturbation_norm, run_attack
from apudae_engine.evaluation.attacks.aware import held_out_seeds
from apudae_engine.evaluation.config import EvalConfig
from apudae_engine.evaluation.outcomes import Row
from apudae_engine.evaluation.schedule import Table

log = logging.getLogger(__name__)

SEED_STRIDE = 7919  # batch b's attacks and noise use seed + SEED_STRIDE * b


class BatchScorer:
    """Crafts a batch's inputs, row by row, and scores every defense on them.

    Args:
        config: the run's resolved settings (eps, seed, draws, aware_target, examples).
        classifier: the classifier under attack, in eval mode on the images' device.
        base: the calibrated purifier whose DAE gives each input's reconstruction error.
        defenses: defense name -> its purifier (None: the bare classifier), in table order;
            each purifies with its own backend (a faster one may score; attacks always
            differentiate through the reference).
    """

    def __init__(self, config: EvalConfig, classifier: torch.nn.Module, base: Purifier,
                 defenses: dict[str, Purifier | None]) -> None:
        self.config = config
        self.classifier = classifier
        self.base = base
        self.defenses = defenses

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
        if pur is not None:
            x = pur.purify(x).images  # scored as the engine runs it
        return self.classifier(x).argmax(1), x

    def _held_out_correct(self, pur: Purifier, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return held_out_correct(pur, self.classifier, x, y, self.config.draws)

    def score(self, t: Table, g: int, start: int, stop: int, x: torch.Tensor, y: torch.Tensor,
              heartbeat=None) -> list[Row]:
        """Every row of ``t`` on batch ``g`` (images ``start:stop`` of the run: ``x`` in
        [0, 1], NCHW, labels ``y``), scored on every defense; ``heartbeat()`` after each row."""
        c, t_start = self.config, time.perf_counter()
        out = [Row(row, "Linf" if row == "noise" else None, c.eps if row == "noise" else None)
               if isinstance(row, str) else Row(row.name, row.norm, row.eps) for row in t.rows]
        # g counts batches from the split's start: --offset runs and resumed runs give each
        # batch the seeds one run over the whole split would.
        seed = c.seed + SEED_STRIDE * g
        for spec, acc in zip(t.rows, out, strict=True):
            t_row = t0 = time.perf_counter()
            cpu0 = time.process_time()
            adv, acc.budget = self._inputs(spec, x, y, seed, t.purifier)
            t_attack = acc.attack_seconds = time.perf_counter() - t0
            acc.attack_cpu_seconds = time.process_time() - cpu0
            if acc.norm is not None:
                acc.norms.append(perturbation_norm(adv, x, acc.norm).cpu())
            acc.errors.append(self.base.reconstruction_error(adv).cpu())
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


@torch.no_grad()
def held_out_correct(pur: Purifier, classifier: torch.nn.Module, x: torch.Tensor,
                     y: torch.Tensor, draws: int) -> torch.Tensor:
    """Per image, how many of ``draws`` held-out noise seeds (none seen by an attack) leave
    ``pur``'s prediction correct: (N,) int64."""
    count = torch.zeros(x.shape[0], dtype=torch.int64)
    for seed in held_out_seeds(draws):
        xp = pur.purify(x, seed=seed).images
        count += (classifier(xp).argmax(1) == y).cpu().to(torch.int64)
    return count


def _row_name(row: Row) -> str:
    """A row's name with its threat model, for progress lines (``pgd (Linf 0.05)``)."""
    return row.name if row.eps is None or row.name == "noise" else (
        f"{row.name} ({row.norm} {row.eps:.3g})")
