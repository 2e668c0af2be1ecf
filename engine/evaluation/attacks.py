"""Adversarial attacks for evaluating purification, each with the budget it spent.

Two families, kept apart because they answer different questions:

- *Library attacks* (``LIBRARY_ATTACKS``) come from torchattacks (the ``eval`` extra) and are
  crafted on whatever model they are given, usually the bare classifier (the authors' oblivious
  setting): FGSM, R-FGSM, PGD (L-inf, L2), C&W-L2, DeepFool and AutoAttack with the original
  paper's step counts (torchattacks' ``AutoAttack`` class runs APGD/APGD-T/FAB with 10 steps;
  Croce & Hein use 100, which is what ``autoattack`` here configures).
- *Defense-aware attacks* (``DEFENSE_AWARE_ATTACKS``), written in :mod:`.aware_attacks`
  because no library has them, attack classifier(purify(x)): ``pgd-eot`` (exact gradient
  through the unrolled loop, with EOT over the purifier's noise), ``bpda`` and ``bpda-dae``
  (identity or DAE as the backward pass, with EOT) and ``below-mu`` (keep r(x_adv) under mu so
  the adaptive hinge never fires).

Every attack takes NCHW float images in [0, 1] with int64 labels and returns images inside the
eps-ball of its norm and inside [0, 1] (minimal-norm attacks, C&W and DeepFool, are projected
onto the ball), together with an :class:`AttackBudget`.

Example::

    spec = AttackSpec("pgd", eps=0.1, steps=40)
    result = run_attack(spec, classifier, images, labels)
    aware = run_attack(AttackSpec("pgd-eot", eps=0.1, steps=20, eot=4), classifier, images,
                       labels, purifier=purifier)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from apudae_engine.backends.purifier import Purifier
from apudae_engine.core.errors import BackendUnavailable

LIBRARY_ATTACKS = ("fgsm", "rfgsm", "pgd", "pgd-l2", "cw-l2", "deepfool", "autoattack")
DEFENSE_AWARE_ATTACKS = ("pgd-eot", "bpda", "bpda-dae", "below-mu")
ATTACKS = LIBRARY_ATTACKS + DEFENSE_AWARE_ATTACKS
_L2 = ("pgd-l2", "cw-l2", "deepfool")
# Full-strength step counts; the evaluation's quick mode passes smaller ones explicitly.
DEFAULT_STEPS = {"fgsm": 1, "rfgsm": 1, "pgd": 40, "pgd-l2": 40, "cw-l2": 100, "deepfool": 50,
                 "autoattack": 100, "pgd-eot": 20, "bpda": 40, "bpda-dae": 40, "below-mu": 100}
_INSTALL_HINT = ("torchattacks is not installed; `pip install --no-deps torchattacks==3.5.1 scipy` "
                 "(its metadata pins torchvision and an old requests, which it never imports)")


@dataclass(frozen=True)
class AttackSpec:
    """One attack and its budget.

    Args:
        name: one of ``ATTACKS``.
        eps: radius of the threat model (L2 for ``pgd-l2``, ``cw-l2``, ``deepfool``; L-inf
            for the others).
        steps: iterations (None: ``DEFAULT_STEPS``); for AutoAttack the APGD/APGD-T/FAB steps.
        alpha: step size of iterative attacks (None: 2.5 * eps / steps, Madry et al.'s rule).
        eot: noise draws averaged per gradient (defense-aware attacks).
        seed: seeds random starts and the EOT noise draws.
        loss: ``ce`` or ``margin`` (None: ``margin`` for ``below-mu``, ``ce`` otherwise).
        penalty: lambda of the ``below-mu`` reconstruction penalty.
        kappa: cap on the ``below-mu`` classifier margin (beyond it only the penalty acts).
        square_queries: queries of AutoAttack's Square attack (5000 in the original).
        cw_c: C&W trade-off constant.
    """

    name: str
    eps: float
    steps: int | None = None
    alpha: float | None = None
    eot: int = 1
    seed: int = 0
    loss: str | None = None
    penalty: float = 10.0
    kappa: float = 5.0
    square_queries: int = 5000
    cw_c: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in ATTACKS:
            raise ValueError(f"unknown attack {self.name!r}; known: {', '.join(ATTACKS)}")
        if not self.eps > 0:
            raise ValueError(f"eps must be positive, got {self.eps}")
        if self.steps is None:
            object.__setattr__(self, "steps", DEFAULT_STEPS[self.name])
        if self.steps < 1 or self.eot < 1 or self.square_queries < 1:
            raise ValueError("steps, eot and square_queries must be at least 1")
        if self.loss is None:
            object.__setattr__(self, "loss", "margin" if self.name == "below-mu" else "ce")
        if self.loss not in ("ce", "margin"):
            raise ValueError(f"loss must be ce or margin, got {self.loss!r}")

    @property
    def norm(self) -> str:
        return "L2" if self.name in _L2 else "Linf"

    @property
    def step_size(self) -> float:
        return self.alpha if self.alpha is not None else 2.5 * self.eps / self.steps

    @property
    def defense_aware(self) -> bool:
        return self.name in DEFENSE_AWARE_ATTACKS


@dataclass
class AttackBudget:
    """What an attack spent. Counts are totals over ``images``; ``to_dict`` gives per image.

    ``purifier_forward``/``purifier_backward`` count whole purification runs (all T steps) and
    backward passes through a whole unrolled run; ``dae_*`` count single DAE evaluations made
    outside a purification run; ``classifier_gradients`` count backward passes through the
    classifier (EOT draws included).
    """

    attack: str
    norm: str
    eps: float
    steps: int
    eot: int = 1
    images: int = 0
    classifier_forward: int = 0
    classifier_gradients: int = 0
    purifier_forward: int = 0
    purifier_backward: int = 0
    dae_forward: int = 0
    dae_backward: int = 0
    settings: dict[str, Any] = field(default_factory=dict)

    _COUNTS = ("classifier_forward", "classifier_gradients", "purifier_forward",
               "purifier_backward", "dae_forward", "dae_backward")

    def merge(self, other: AttackBudget) -> AttackBudget:
        """Add the counts of another batch of the same attack."""
        self.images += other.images
        for k in self._COUNTS:
            setattr(self, k, getattr(self, k) + getattr(other, k))
        for k, v in other.settings.items():
            if k.endswith("_count"):
                self.settings[k] = self.settings.get(k, 0) + v
            else:
                self.settings.setdefault(k, v)
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        n = max(self.images, 1)
        d["per_image"] = {k: round(getattr(self, k) / n, 3) for k in self._COUNTS}
        return d


@dataclass
class AttackResult:
    """Adversarial images (N, C, H, W) in [0, 1] within the eps-ball, and the budget spent."""

    images: torch.Tensor
    budget: AttackBudget


def project(adv: torch.Tensor, x: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Project ``adv`` onto the ``norm`` ball of radius ``eps`` around ``x``, then into [0, 1]."""
    delta = adv - x
    if norm == "Linf":
        delta = delta.clamp(-eps, eps)
    else:
        n = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        delta = delta * torch.clamp(eps / n, max=1.0).view(-1, *([1] * (x.dim() - 1)))
    # Clamping to [0, 1] never moves a pixel further from x (x is in [0, 1]): the norm holds.
    return (x + delta).clamp(0.0, 1.0)


def perturbation_norm(adv: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-image L-inf or L2 norm of adv - x: (N,)."""
    d = (adv - x).flatten(1)
    return d.abs().amax(dim=1) if norm == "Linf" else d.norm(dim=1)


def classifier_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-image loss to *maximise*: ``ce`` cross-entropy or ``margin`` max_{j!=y} z_j - z_y."""
    if kind == "ce":
        return F.cross_entropy(logits, labels, reduction="none")
    true = logits.gather(1, labels[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), -math.inf)
    return other.amax(dim=1) - true


class _Counted(nn.Module):
    """Wraps a classifier so library attacks' forward and backward passes are counted."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.forward_images = 0
        self.backward_images = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        self.forward_images += x.shape[0]
        if out.requires_grad:
            n = x.shape[0]
            out.register_hook(lambda g: self._count_backward(n))
        return out

    def _count_backward(self, n: int) -> None:
        self.backward_images += n


def _torchattacks():
    try:
        import torchattacks
    except ImportError:
        raise BackendUnavailable(_INSTALL_HINT) from None
    return torchattacks


def _library_attack(spec: AttackSpec, model: _Counted, num_classes: int):
    ta = _torchattacks()
    s, eps, a = spec.steps, spec.eps, spec.step_size
    if spec.name == "fgsm":
        return ta.FGSM(model, eps=eps), {}
    if spec.name == "rfgsm":
        # Tramer et al.'s R+FGSM: a random sign step of eps/2, then a gradient sign step of
        # eps/2; torchattacks clamps the result to the eps-ball (the authors' code did not).
        return ta.RFGSM(model, eps=eps, alpha=eps / 2, steps=1), {"alpha": eps / 2}
    if spec.name == "pgd":
        return ta.PGD(model, eps=eps, alpha=a, steps=s, random_start=True), {"alpha": a}
    if spec.name == "pgd-l2":
        return ta.PGDL2(model, eps=eps, alpha=a, steps=s, random_start=True), {"alpha": a}
    if spec.name == "cw-l2":
        return (ta.CW(model, c=spec.cw_c, kappa=0, steps=s, lr=0.01),
                {"c": spec.cw_c, "kappa": 0, "lr": 0.01, "projected_to_eps": True})
    if spec.name == "deepfool":
        return ta.DeepFool(model, steps=s, overshoot=0.02), {
            "overshoot": 0.02, "overshoot_on": "total perturbation", "projected_to_eps": True}
    # AutoAttack "standard" as in Croce & Hein (2020): APGD-CE, APGD-T (9 target classes),
    # FAB-T (9 target classes), Square (5000 queries), one restart each, 100 iterations.
    common = dict(norm="Linf", eps=eps, seed=spec.seed, n_restarts=1)
    parts = [ta.APGD(model, steps=s, loss="ce", **common),
             ta.APGDT(model, steps=s, n_classes=num_classes, **common),
             ta.FAB(model, steps=s, multi_targeted=True, n_classes=num_classes, **common),
             ta.Square(model, n_queries=spec.square_queries, **common)]
    return ta.MultiAttack(parts), {"version": "standard", "apgd_steps": s, "apgdt_steps": s,
                                   "fab_steps": s, "square_queries": spec.square_queries,
                                   "target_classes": num_classes - 1}


def _run_library(spec: AttackSpec, classifier: nn.Module, x: torch.Tensor,
                 y: torch.Tensor) -> AttackResult:
    counted = _Counted(classifier.eval())
    with torch.no_grad():
        num_classes = int(classifier(x[:1]).shape[1])
    attack, settings = _library_attack(spec, counted, num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        raw = attack(x, y).detach()
    if spec.name == "deepfool":
        # Original DeepFool scales the *total* perturbation by 1 + overshoot. torchattacks
        # scales each step instead, so its iterates approach the boundary without crossing it
        # (on the bundled fmnist model about half the images end with a ~1e-5 logit margin).
        raw = (x + (1 + settings["overshoot"]) * (raw - x)).clamp(0, 1)
    adv = project(raw, x, spec.norm, spec.eps)
    if settings.get("projected_to_eps"):
        over = perturbation_norm(raw, x, spec.norm) > spec.eps * (1 + 1e-6)
        settings = {**settings, "projected_count": int(over.sum())}
    budget = AttackBudget(spec.name, spec.norm, spec.eps, spec.steps, images=x.shape[0],
                          classifier_forward=counted.forward_images,
                          classifier_gradients=counted.backward_images, settings=settings)
    return AttackResult(adv, budget)


def run_attack(spec: AttackSpec, classifier: nn.Module, images: torch.Tensor,
               labels: torch.Tensor, purifier: Purifier | None = None) -> AttackResult:
    """Craft adversarial examples for one batch.

    Args:
        spec: the attack and its budget.
        classifier: logits model on [0, 1] images (eval mode).
        images: (N, C, H, W) float in [0, 1]; labels: (N,) int64 true classes.
        purifier: the defense a defense-aware attack targets (required for those; library
            attacks ignore it and attack ``classifier`` alone).
    Returns: AttackResult with images within ``spec.eps`` (``spec.norm``) and in [0, 1].
    """
    classifier.eval()
    if spec.defense_aware:
        if purifier is None:
            raise ValueError(f"{spec.name} attacks a purifier; pass purifier=")
        from apudae_engine.evaluation.aware_attacks import run_defense_aware

        result = run_defense_aware(spec, classifier, purifier, images, labels)
    else:
        result = _run_library(spec, classifier, images, labels)
    result.images = project(result.images, images, spec.norm, spec.eps)
    return result
