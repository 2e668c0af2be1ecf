"""APGD against the purifier: Croce & Hein's step-size schedule, best-so-far per image on
noise draws the gradient never used, early stop, restarts, and a worst-case suite.

- ``apgd-ce`` / ``apgd-dlr``: APGD (momentum 0.75, checkpoints at 22 %, then shrinking by 3 %
  of the steps down to 6 %; the step size, 2 eps at first, halves at a checkpoint when fewer
  than 75 % of the steps since the last one raised the loss, or when neither the step nor the
  best loss changed) on the exact EOT gradient through the unrolled purification loop, with
  the cross-entropy or the DLR loss: AutoAttack's ``rand`` protocol (APGD-CE, APGD-DLR,
  ``eot`` draws per gradient, no restarts by default).
- ``apgd-bpda`` / ``apgd-bpda-dae``: the same schedule on the BPDA gradient (identity or DAE
  backward).
- ``apgd-below-mu``: the same schedule on min(margin, kappa) - penalty * max(0, r - (mu -
  0.25 sigma))^2 / sigma^2 at x_adv itself: keeps r a little under mu, so the adaptive hinge
  stays off, with the full eps budget.
- ``aware-suite``: the five above in turn (AutoAttack style): each runs only on the images
  no earlier one fooled, so the result is the per-image worst case over all of them.

Best-so-far: every iterate is checked on ``draws`` noise draws of the real purifier, none of
them used for a gradient: the defense's own seed first (the attacker who knows the seed), then
fresh seeds. An image keeps the iterate classified correctly on the fewest of these draws (ties:
the larger attack loss), so a misclassified iterate, once found, is never given up for one
classified correctly. An image misclassified on all its draws stops (early stop). To save
passes, the other draws are checked only when the defense's seed is fooled, and the iterate is
checked at all only when one of its gradient draws misclassified (else it counts as correct
on every draw). Robust accuracy is then scored by the evaluation on held-out seeds no attack
saw (:func:`~apudae_engine.evaluation.attacks.aware.held_out_seeds`).

Example::

    attack = attack_class("apgd-ce")(classifier, purifier=purifier, eps=0.1, steps=100, eot=20)
    adv = attack(images, labels)
    attack.budget.to_dict()["per_image"]      # purifier passes etc. per image
    attack.correct_draws                      # (N,) selection draws still classified correctly
"""

from __future__ import annotations

import math
from collections import Counter

import torch

from apudae_engine import reconstruction_error
from apudae_engine.evaluation.attacks.aware import (
    ATTACK_SEED_SPACE,
    DefenseAwareAttack,
    eot_objective,
    purified_logits,
)
from apudae_engine.evaluation.attacks.base import AttackBudget, attack_class, classifier_loss

MOMENTUM = 0.75  # Croce & Hein's alpha
RHO = 0.75  # a checkpoint halves the step when fewer than rho of its steps raised the loss


def attack_seed(base: int, stream: int, index: int) -> int:
    """A noise seed below 2**31 for stream ``stream`` (1 EOT, 2 selection, 3 starts)."""
    return (1_000_003 * (base + 1) + 104_729 * stream * (index + 1)
            + 15_485_863 * stream) % ATTACK_SEED_SPACE


def selection_seeds(purifier, base: int, draws: int) -> list[int]:
    """The seeds an iterate is checked on: the defense's own seed, then fresh attack seeds."""
    return [purifier.config.seed] + [attack_seed(base, 2, j) for j in range(draws - 1)]


def checkpoint_schedule(steps: int) -> list[int]:
    """Iterations (from 1) after which APGD checks its step size: first at 22 % of the steps,
    then at intervals shrinking by 3 % of the steps down to 6 % (AutoAttack's integer form)."""
    first, least, shrink = max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), max(
        int(0.03 * steps), 1)
    out, at, interval = [], 0, first
    while at + interval <= steps:
        at += interval
        out.append(at)
        interval = max(interval - shrink, least)
    return out


class APGD(DefenseAwareAttack):
    """APGD with EOT on one objective (``mode``); see the module docstring."""

    mode = "full"
    uses_eot = True
    default_steps, quick_steps = 100, 4
    in_default_run = False
    threshold_sigmas = 0.0  # below-mu only: keep r under mu - this * sigma

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.correct_draws: torch.Tensor | None = None

    # -- objective -----------------------------------------------------------------------
    def objective(self, adv: torch.Tensor, y: torch.Tensor, step: int, restart: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss (n,), gradient, any gradient draw misclassified (n,))."""
        spec, n = self.spec, adv.shape[0]
        base = spec.seed + 7_919 * restart
        seeds = [attack_seed(base, 1, step * spec.eot + k) for k in range(spec.eot)]
        self._count(n * len(seeds), purifier_forward=1, classifier_forward=1,
                    classifier_gradients=1, purifier_backward=int(self.mode == "full"),
                    dae_forward=int(self.mode == "bpda-dae"),
                    dae_backward=int(self.mode == "bpda-dae"))
        return eot_objective(self.mode, self.model, self.purifier, adv, y, seeds, spec.loss)

    def feasible(self, adv: torch.Tensor) -> torch.Tensor | None:
        """Which iterates best-so-far may keep, (n,) bool; None: every one (the
        detector-aware attack keeps only those under the flag threshold)."""
        return None

    # -- best-so-far on selection draws ---------------------------------------------------
    @torch.no_grad()
    def correct_on_draws(self, adv: torch.Tensor, y: torch.Tensor, seeds: list[int]
                         ) -> torch.Tensor:
        """Selection draws classified correctly, (n,) int64: the first seed on every image, the
        others only where the first is fooled (elsewhere all count as correct)."""
        n = adv.shape[0]
        correct = torch.full((n,), len(seeds), dtype=torch.int64, device=adv.device)
        first = purified_logits(self.model, self.purifier, adv, seeds[0]).argmax(1) == y
        self._count(n, purifier_forward=1, classifier_forward=1)
        fooled = (~first).nonzero().squeeze(1)
        if fooled.numel():
            count = torch.zeros(fooled.numel(), dtype=torch.int64, device=adv.device)
            for s in seeds[1:]:
                logits = purified_logits(self.model, self.purifier, adv[fooled], s)
                count += (logits.argmax(1) == y[fooled]).to(torch.int64)
            self._count(fooled.numel() * (len(seeds) - 1), purifier_forward=1,
                        classifier_forward=1)
            correct[fooled] = count
        return correct

    def _consider(self, rows: torch.Tensor, adv: torch.Tensor, y: torch.Tensor,
                  loss: torch.Tensor, hint: torch.Tensor, seeds: list[int]) -> None:
        """Keep, per image in ``rows``, the iterate with the fewest correct draws (among the
        feasible ones)."""
        correct = torch.full_like(rows, len(seeds))
        ok = self.feasible(adv)
        if ok is not None:
            hint = hint & ok  # an infeasible iterate is never kept: no need to check it
        check = hint.nonzero().squeeze(1)
        if check.numel():
            correct[check] = self.correct_on_draws(adv[check], y[check], seeds)
        old_c, old_l = self._best_correct[rows], self._best_loss[rows]
        better = (correct < old_c) | ((correct == old_c) & (loss > old_l))
        if ok is not None:
            better &= ok
        take = rows[better]
        self._best[take] = adv[better].detach()
        self._best_correct[take] = correct[better]
        self._best_loss[take] = loss[better].detach()

    def _count(self, passes: int, **per_pass: int) -> None:
        for k, v in per_pass.items():
            self._counts[k] += passes * v

    # -- the attack -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        spec, n = self.spec, x.shape[0]
        self._counts: Counter = Counter()
        self._iterations = 0
        seeds = selection_seeds(self.purifier, spec.seed, spec.draws)
        self._best = x.clone()
        self._best_loss = torch.full((n,), -math.inf, device=x.device)
        self._best_correct = self.correct_on_draws(x, y, seeds)
        ok = self.feasible(x)
        if ok is not None:  # an infeasible input is not fooled yet: any feasible iterate wins
            self._best_correct[~ok] = len(seeds)
        restarts_run = 0
        for restart in range(spec.restarts):
            todo = (self._best_correct > 0).nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            restarts_run += 1
            self._run(x, y, todo, restart, seeds)
        self.correct_draws = self._best_correct.clone()
        self.budget = self.new_budget(n, **self._counts)
        self.budget.settings.update(
            alpha=f"APGD: 2 eps, halved at checkpoints {checkpoint_schedule(spec.steps)}",
            momentum=MOMENTUM, rho=RHO, restarts=spec.restarts, selection_draws=spec.draws,
            selection_seeds=seeds, iterations_count=self._iterations,
            restarts_run_count=restarts_run,
            fooled_on_all_draws_count=int((self._best_correct == 0).sum()))
        return self._best

    def _start(self, x: torch.Tensor, restart: int) -> torch.Tensor:
        gen = torch.Generator(device="cpu").manual_seed(attack_seed(self.spec.seed, 3, restart))
        t = torch.rand(x.shape, generator=gen, dtype=x.dtype).to(x.device) * 2 - 1
        t = t / t.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
        return (x + self.spec.eps * t).clamp(0, 1)

    def _project(self, adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        eps = self.spec.eps
        return torch.minimum(torch.maximum(adv, x - eps), x + eps).clamp(0, 1)

    def _run(self, x_all: torch.Tensor, y_all: torch.Tensor, idx: torch.Tensor, restart: int,
             seeds: list[int]) -> None:
        """One APGD run on images ``idx``; each stops once fooled on every selection draw."""
        spec = self.spec
        x, y, m = x_all[idx], y_all[idx], idx.numel()
        adv = self._start(x, restart)
        loss, grad, hint = self.objective(adv, y, 0, restart)
        self._iterations += m
        self._consider(idx, adv, y, loss, hint, seeds)
        best_adv, best_grad, loss_best = adv.clone(), grad.clone(), loss.clone()
        step = torch.full((m,), 2.0 * spec.eps, dtype=x.dtype, device=x.device)
        previous = adv.clone()
        loss_steps = torch.zeros(spec.steps + 1, m, dtype=loss.dtype, device=x.device)
        loss_steps[0] = loss
        checkpoints = set(checkpoint_schedule(spec.steps))
        last_check, loss_at_check = 0, loss_best.clone()
        reduced_at_check = torch.ones(m, dtype=torch.bool, device=x.device)
        for i in range(1, spec.steps + 1):
            active = (self._best_correct[idx] > 0).nonzero().squeeze(1)
            if active.numel() == 0:
                break
            a = active
            cur = adv[a]
            z = self._project(cur + step[a].view(-1, 1, 1, 1) * grad[a].sign(), x[a])
            mom = MOMENTUM if i > 1 else 1.0
            new = self._project(cur + mom * (z - cur) + (1 - mom) * (cur - previous[a]), x[a])
            previous[a], adv[a] = cur, new
            loss_a, grad_a, hint_a = self.objective(new, y[a], i, restart)
            self._iterations += a.numel()
            grad[a], loss_steps[i, a] = grad_a, loss_a
            self._consider(idx[a], new, y[a], loss_a, hint_a, seeds)
            up = loss_a > loss_best[a]
            best_adv[a[up]], best_grad[a[up]], loss_best[a[up]] = new[up], grad_a[up], loss_a[up]
            if i in checkpoints:
                # Fewer than rho of the steps since the last checkpoint raised the loss, or
                # neither the step size nor the best loss changed: halve, restart from the best.
                rises = (loss_steps[last_check + 1:i + 1] > loss_steps[last_check:i]).sum(0)
                oscillating = rises <= RHO * (i - last_check)
                stalled = ~reduced_at_check & (loss_at_check >= loss_best)
                halve = oscillating | stalled
                reduced_at_check, loss_at_check, last_check = halve, loss_best.clone(), i
                step[halve] /= 2
                adv[halve], grad[halve] = best_adv[halve], best_grad[halve]


class APGDCE(APGD, name="apgd-ce", label="APGD-CE, full gradient"):
    """APGD on the exact EOT gradient through the unrolled loop, cross-entropy loss."""

    default_loss = "ce"


class APGDDLR(APGD, name="apgd-dlr", label="APGD-DLR, full gradient"):
    """APGD on the exact EOT gradient through the unrolled loop, DLR loss."""

    default_loss = "dlr"


class APGDBPDA(APGD, name="apgd-bpda", label="APGD, BPDA identity backward"):
    """APGD on the BPDA gradient (the purifier forward, the identity backward)."""

    mode, default_loss = "bpda", "dlr"


class APGDBPDADAE(APGD, name="apgd-bpda-dae", label="APGD, BPDA DAE backward"):
    """APGD on the BPDA gradient (the purifier forward, the DAE backward)."""

    mode, default_loss = "bpda-dae", "dlr"


class APGDBelowMu(APGD, name="apgd-below-mu", label="APGD, r kept below mu - 0.25 sigma"):
    """APGD on min(margin, kappa) - penalty * max(0, r - (mu - 0.25 sigma))^2 / sigma^2 at
    x_adv: the adaptive hinge stays off, the full eps is used; no noise to average."""

    mode, default_loss, uses_eot, threshold_sigmas = "below-mu", "margin", False, 0.25

    def objective(self, adv, y, step, restart):
        spec, pur, n = self.spec, self.purifier, adv.shape[0]
        sigma = pur.effective_sigma
        threshold = pur.mu - self.threshold_sigmas * sigma
        self._count(n, classifier_forward=1, classifier_gradients=1, dae_forward=1,
                    dae_backward=1)
        xr = adv.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = self.model(xr)
            margin = classifier_loss(logits, y, "margin")
            excess = torch.clamp(reconstruction_error(pur.dae, xr) - threshold, min=0.0) / sigma
            value = torch.clamp(margin, max=spec.kappa) - spec.penalty * excess * excess
            (g,) = torch.autograd.grad(value.sum(), xr)
        return value.detach(), g, logits.detach().argmax(1) != y

    def new_budget(self, images, **counts):
        budget = super().new_budget(images, **counts)
        budget.settings.update(penalty=self.spec.penalty, kappa=self.spec.kappa,
                               threshold=f"mu - {self.threshold_sigmas} sigma")
        return budget


class AwareSuite(DefenseAwareAttack, name="aware-suite",
                 label="worst case per image, APGD suite"):
    """APGD-CE, APGD-DLR, APGD below mu, APGD-BPDA (DAE), APGD-BPDA (identity) in turn, each
    on the images no earlier member fooled on every selection draw (AutoAttack's cascade):
    the per-image worst case over the five. Members take this attack's settings (their own
    default loss); the budget adds theirs, and ``settings`` say how many images each member
    attacked and left fooled."""

    members = ("apgd-ce", "apgd-dlr", "apgd-below-mu", "apgd-bpda-dae", "apgd-bpda")
    uses_eot = True
    default_steps, quick_steps = 100, 4
    in_default_run = True  # evaluate's default defense-aware attack: the strongest we have

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        spec, n = self.spec, x.shape[0]
        adv = x.clone()
        correct = torch.full((n,), spec.draws, dtype=torch.int64, device=x.device)
        budget = self.new_budget(n)
        settings: dict[str, int] = {}
        todo = torch.arange(n, device=x.device)
        for name in self.members:
            cls = attack_class(name)
            member = cls(self.model, purifier=self.purifier, eps=spec.eps, steps=spec.steps,
                         eot=spec.eot, seed=spec.seed, penalty=spec.penalty, kappa=spec.kappa,
                         restarts=spec.restarts, draws=spec.draws, loss=cls.default_loss)
            result = member.run(x[todo], y[todo])
            # Fewer correct draws wins; an image no member moves keeps the first member's
            # highest-loss iterate (not the clean image) for the held-out draws to score.
            better = (member.correct_draws < correct[todo]) | (name == self.members[0])
            adv[todo[better]] = result.images[better]
            correct[todo[better]] = member.correct_draws[better]
            fooled = int((member.correct_draws == 0).sum())
            settings[f"{name}_images_count"] = int(todo.numel())
            settings[f"{name}_fooled_count"] = fooled
            settings[f"{name}_iterations_count"] = result.budget.settings["iterations_count"]
            settings[f"{name}_purifier_backward_count"] = result.budget.purifier_backward
            _add_counts(budget, result.budget)
            todo = todo[member.correct_draws > 0]
            if todo.numel() == 0:
                break
        self.correct_draws = correct
        budget.settings.update(settings, members=list(self.members), selection_draws=spec.draws,
                               restarts=spec.restarts, alpha="APGD schedule (see members)")
        self.budget = budget
        return adv


_COUNTED = ("classifier_forward", "classifier_gradients", "purifier_forward", "purifier_backward",
            "dae_forward", "dae_backward")


def _add_counts(total: AttackBudget, part: AttackBudget) -> None:
    for k in _COUNTED:
        setattr(total, k, getattr(total, k) + getattr(part, k))
