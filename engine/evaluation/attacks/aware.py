"""Attacks that know the defense: they attack classifier(purify(x)), not the classifier alone.

- ``pgd-eot``: L-inf PGD on the exact gradient through the unrolled purification loop (every
  Adam step and DAE pass), averaged over ``eot`` draws of the purifier's noise (a fresh seed
  per draw and step; the image ids keying the noise are the default pixel fingerprints).
- ``bpda`` / ``bpda-dae``: the purifier in the forward pass; the identity, or the DAE, in the
  backward pass (Athalye et al.'s BPDA), with EOT.
- ``below-mu``: maximise min(margin, kappa) - penalty * max(0, r(x_adv) - mu)^2 / sigma^2 on
  x_adv, so the adaptive hinge never fires and purification only adds noise.

No library has them. Each budget counts whole purification runs forward and backward, single
DAE passes and classifier gradients.

Example::

    attack = PGDEOT(classifier, purifier=purifier, eps=0.1, steps=20, eot=4)
    adv = attack(images, labels)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from apudae_engine import Purifier, reconstruction_error
from apudae_engine.evaluation.attacks.base import Attack, AttackSpec, classifier_loss, project


def purified_logits(classifier: nn.Module, purifier: Purifier, x: torch.Tensor, seed: int,
                    image_ids: torch.Tensor | None = None,
                    differentiable: bool = False, gradient: str = "auto") -> torch.Tensor:
    """classifier(purify(x)) with the purifier's settings and noise seed ``seed``: (N, K).

    ``gradient`` (with ``differentiable``): ``autograd`` differentiates the reference loop
    (double backward through every step); ``hvp`` takes each step's Hessian-vector product as
    one JVP and one VJP through the DAE (exact for a piecewise-linear DAE); ``auto`` uses
    ``hvp`` where it is exact (:meth:`Purifier.purify`).
    """
    if not differentiable:
        with torch.no_grad():
            return classifier(purifier.purify(x, image_ids, seed=seed).images)
    out = purifier.purify(x, image_ids, differentiable=True, seed=seed, gradient=gradient)
    return classifier(out.images)


# Seeds the attacks draw noise with lie below 2**31; held-out evaluation draws lie above
# (``held_out_seeds``), so no attack ever optimises against or selects on them.
ATTACK_SEED_SPACE = 2**31


def _eot_seed(base: int, step: int, draw: int, eot: int) -> int:
    return (1_000_003 * (base + 1) + step * eot + draw) % ATTACK_SEED_SPACE


def held_out_seeds(k: int) -> list[int]:
    """k noise seeds no attack uses (all >= 2**31): the fresh draws robust accuracy is scored
    on."""
    return [ATTACK_SEED_SPACE + 7_919 * (j + 1) for j in range(k)]


def eot_objective(mode: str, classifier: nn.Module, purifier: Purifier, x: torch.Tensor,
                  y: torch.Tensor, seeds: list[int], loss: str = "ce",
                  image_ids: torch.Tensor | None = None, gradient: str = "auto",
                  kappa: float | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean over noise seeds of loss(classifier(purify(x)), y), its gradient, and whether any
    draw misclassified: ((N,), (N, C, H, W), (N,) bool).

    ``mode``: ``full`` differentiates through the unrolled purification loop; ``bpda`` uses
    the identity as the purifier's backward pass, ``bpda-dae`` the DAE (clamped to [0, 1]).
    The loss value is always that of the true purifier. ``gradient``: how ``full`` takes it
    (:func:`purified_logits`). ``kappa``: cap each draw's loss at this value (a fooled draw
    then stops pulling; the detector-aware attack spends the rest on r).
    """
    grad = torch.zeros_like(x)
    value = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    wrong = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for seed in seeds:
        xr = x.detach().requires_grad_(True)
        with torch.enable_grad():
            if mode == "full":
                logits = purified_logits(classifier, purifier, xr, seed, image_ids, True,
                                         gradient)
            else:
                with torch.no_grad():
                    xp = purifier.purify(xr, image_ids, seed=seed).images
                surrogate = xr if mode == "bpda" else purifier.dae(xr).clamp(0, 1)
                logits = classifier(surrogate + (xp - surrogate).detach())
            per_image = classifier_loss(logits, y, loss)
            if kappa is not None:
                per_image = per_image.clamp(max=kappa)
            (g,) = torch.autograd.grad(per_image.sum(), xr)
        grad += g
        value += per_image.detach()
        wrong |= logits.detach().argmax(1) != y
    grad /= len(seeds)
    if not torch.isfinite(grad).all():
        raise RuntimeError(f"{mode} gradient through the purifier is not finite")
    return value / len(seeds), grad, wrong


def eot_gradient(mode: str, classifier: nn.Module, purifier: Purifier, x: torch.Tensor,
                 y: torch.Tensor, seeds: list[int], loss: str = "ce",
                 image_ids: torch.Tensor | None = None, gradient: str = "auto") -> torch.Tensor:
    """Gradient of the mean over noise seeds of sum_batch loss(classifier(purify(x)), y)
    (:func:`eot_objective`'s gradient). Shapes: x (N, C, H, W), y (N,) -> (N, C, H, W).
    """
    return eot_objective(mode, classifier, purifier, x, y, seeds, loss, image_ids, gradient)[1]


def _ascent(spec: AttackSpec, x: torch.Tensor, random_start: bool,
            gradient: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
    """Sign-gradient ascent (L-inf PGD) from x or a seeded random start, projected each step."""
    adv = x
    if random_start:
        gen = torch.Generator(device="cpu").manual_seed(spec.seed)
        noise = torch.rand(x.shape, generator=gen, dtype=x.dtype).to(x.device) * 2 - 1
        adv = project(x + spec.eps * noise, x, "Linf", spec.eps)
    for step in range(spec.steps):
        g = gradient(adv, step)
        adv = project(adv.detach() + spec.step_size * g.sign(), x, "Linf", spec.eps)
    return adv.detach()


class DefenseAwareAttack(Attack):
    """Attacks classifier(purify(x)) for the ``purifier`` it is given."""

    defense_aware = True
    iterative = True

    def new_budget(self, images: int, **counts):
        budget = super().new_budget(images, **counts)
        budget.settings.update(alpha=self.spec.step_size, loss=self.spec.loss,
                               target=_defense_name(self.purifier))
        return budget


class EOTAscent(DefenseAwareAttack):
    """L-inf PGD from a seeded random start on an EOT gradient of ``mode``."""

    mode = "full"
    uses_eot = True
    in_default_run = False  # superseded by aware-suite's APGD versions; kept to compare

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        spec, n, eot = self.spec, x.shape[0], self.spec.eot

        def gradient(adv: torch.Tensor, step: int) -> torch.Tensor:
            seeds = [_eot_seed(spec.seed, step, k, eot) for k in range(eot)]
            return eot_gradient(self.mode, self.model, self.purifier, adv, y, seeds, spec.loss)

        adv = _ascent(spec, x, True, gradient)
        passes = n * eot * spec.steps
        self.budget = self.new_budget(n, purifier_forward=passes, classifier_forward=passes,
                                      classifier_gradients=passes)
        if self.mode == "full":
            self.budget.purifier_backward = passes
        if self.mode == "bpda-dae":
            self.budget.dae_forward = self.budget.dae_backward = passes
        return adv


class PGDEOT(EOTAscent, name="pgd-eot", label="PGD-EOT, full gradient"):
    """Exact gradient through the unrolled purification loop, with EOT over its noise."""

    mode, default_steps, quick_steps = "full", 20, 3


class BPDA(EOTAscent, name="bpda", label="BPDA, identity backward"):
    """The purifier forward, the identity backward (Athalye et al.), with EOT."""

    mode, default_steps, quick_steps = "bpda", 40, 5


class BPDADAE(EOTAscent, name="bpda-dae", label="BPDA, DAE backward"):
    """The purifier forward, the DAE (clamped to [0, 1]) backward, with EOT."""

    mode, default_steps, quick_steps = "bpda-dae", 40, 5


class BelowMu(DefenseAwareAttack, name="below-mu", label="stay below mu"):
    """Maximise min(margin, kappa) - penalty * max(0, r - mu)^2 / sigma^2 on x_adv itself.

    Keeps, per image, the iterate with the largest margin among those with r <= mu (the hinge
    of adaptive purification stays off, so the purifier only adds noise); images with no such
    iterate keep the last one. The objective is deterministic (classifier and r on x_adv), so
    there is no noise to average.
    """

    in_default_run = False  # superseded by apgd-below-mu in aware-suite

    default_steps, quick_steps, default_loss = 100, 10, "margin"

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        spec, classifier, purifier = self.spec, self.model, self.purifier
        mu, sigma = purifier.mu, purifier.effective_sigma
        best = x.clone()
        best_margin = torch.full((x.shape[0],), -math.inf, device=x.device)

        def evaluate(adv: torch.Tensor, need_grad: bool) -> torch.Tensor | None:
            nonlocal best
            xr = adv.detach().requires_grad_(need_grad)
            with torch.set_grad_enabled(need_grad):
                margin = classifier_loss(classifier(xr), y, "margin")
                r = reconstruction_error(purifier.dae, xr)
                feasible = r.detach() <= mu
                better = feasible & (margin.detach() > best_margin)
                best = torch.where(better.view(-1, 1, 1, 1), xr.detach(), best)
                best_margin.copy_(torch.where(better, margin.detach(), best_margin))
                if not need_grad:
                    return None
                excess = torch.clamp(r - mu, min=0.0) / sigma
                objective = torch.clamp(margin, max=spec.kappa) - spec.penalty * excess * excess
                (g,) = torch.autograd.grad(objective.sum(), xr)
            return g

        last = _ascent(spec, x, False, lambda adv, step: evaluate(adv, True))
        evaluate(last, False)
        found = torch.isfinite(best_margin)
        adv = torch.where(found.view(-1, 1, 1, 1), best, last)
        n = x.shape[0]
        self.budget = self.new_budget(n, classifier_forward=n * (spec.steps + 1),
                                      dae_forward=n * (spec.steps + 1),
                                      classifier_gradients=n * spec.steps,
                                      dae_backward=n * spec.steps)
        self.budget.settings.update(penalty=spec.penalty, kappa=spec.kappa, threshold="mu",
                                    below_mu_count=int(found.sum()))
        return adv


def _defense_name(purifier: Purifier) -> str:
    if getattr(purifier, "defense_name", None):
        return purifier.defense_name
    c = purifier.config
    compat = c.sigma_override is not None or not c.clip
    return f"{c.method}{' (compat)' if compat else ''}, {c.steps} steps"
