"""The attack API: :class:`Attack` (registered once by its CLI name), its settings
(:class:`AttackSpec`), what it spent (:class:`AttackBudget`) and the shared helpers.

An attack is a small class in the torchattacks style: constructor keywords, then a call on
NCHW float images in [0, 1] with int64 labels that returns adversarial images inside the
eps-ball of its norm and inside [0, 1]. Subclassing with a ``name`` registers it::

    class MyAttack(Attack, name="my-attack", label="My attack"):
        default_steps = 10

        def forward(self, images, labels):
            ...
            self.budget = self.new_budget(images.shape[0], classifier_gradients=...)
            return adversarial

and ``apudae-engine evaluate --attacks my-attack`` runs it; nothing else lists it.

Example::

    attack = attack_class("pgd")(classifier, eps=0.1, steps=40)
    adv = attack(images, labels)          # (N, C, H, W) in [0, 1]
    attack.budget.to_dict()["per_image"]  # gradient evaluations etc.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

# name -> class, filled by subclassing Attack with name=...; read it through attack_class.
REGISTRY: dict[str, type[Attack]] = {}


def attack_class(name: str) -> type[Attack]:
    """The registered attack called ``name`` (its CLI name); ValueError naming the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown attack {name!r}; known: {', '.join(REGISTRY)}") from None


def attack_names(defense_aware: bool | None = None, default_only: bool = False) -> tuple[str, ...]:
    """Registered attack names in registration order, optionally one family or the defaults."""
    return tuple(n for n, c in REGISTRY.items()
                 if (defense_aware is None or c.defense_aware == defense_aware)
                 and (c.in_default_run or not default_only))


@dataclass(frozen=True)
class AttackSpec:
    """One attack and its budget.

    Args:
        name: a registered attack (``attack_names()``).
        eps: radius of the threat model (the attack class's ``norm``: L2 for ``pgd-l2``,
            ``cw-l2``, ``deepfool``; L-inf for the others).
        steps: iterations (None: the class's ``default_steps``); for AutoAttack the
            APGD/APGD-T/FAB steps.
        alpha: step size of iterative attacks (None: 2.5 * eps / steps, Madry et al.'s rule).
        eot: noise draws averaged per gradient (defense-aware attacks).
        seed: seeds random starts and the EOT noise draws.
        loss: ``ce``, ``margin`` or ``dlr`` (None: the class's ``default_loss``).
        penalty: lambda of the ``below-mu`` reconstruction penalty.
        kappa: cap on the ``below-mu`` classifier margin (beyond it only the penalty acts).
        square_queries: queries of AutoAttack's Square attack (5000 in the original).
        cw_c: C&W trade-off constant.
        restarts: random restarts of the APGD attacks (later ones only on images not yet
            fooled).
        draws: noise draws the APGD attacks check each iterate on (the defense's own seed
            first, then seeds no gradient used) for best-so-far and early stop.
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
    restarts: int = 1
    draws: int = 4

    def __post_init__(self) -> None:
        cls = attack_class(self.name)
        if not self.eps > 0:
            raise ValueError(f"eps must be positive, got {self.eps}")
        if self.steps is None:
            object.__setattr__(self, "steps", cls.default_steps)
        if min(self.steps, self.eot, self.square_queries, self.restarts, self.draws) < 1:
            raise ValueError("steps, eot, square_queries, restarts and draws must be at least 1")
        if self.loss is None:
            object.__setattr__(self, "loss", cls.default_loss)
        if self.loss not in ("ce", "margin", "dlr"):
            raise ValueError(f"loss must be ce, margin or dlr, got {self.loss!r}")

    @property
    def norm(self) -> str:
        return attack_class(self.name).norm

    @property
    def step_size(self) -> float:
        return self.alpha if self.alpha is not None else 2.5 * self.eps / self.steps

    @property
    def defense_aware(self) -> bool:
        return attack_class(self.name).defense_aware

    def build(self, classifier: nn.Module, purifier: Any = None) -> Attack:
        """The attack object with these settings, crafting on ``classifier`` (and ``purifier``
        for defense-aware attacks)."""
        settings = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "name"}
        return attack_class(self.name)(classifier, purifier=purifier, **settings)


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


class Attack:
    """Base of every attack. Subclass with ``name=`` (the CLI name) to register it.

    Class attributes a subclass sets: ``label`` (report row), ``norm`` (``Linf`` or ``L2``),
    ``default_steps``, ``quick_steps`` (steps in ``evaluate --quick``; None: the default),
    ``defense_aware`` (it attacks classifier(purify(x)) and needs ``purifier``), ``iterative``
    (``evaluate --steps``/``--aware-steps`` apply), ``default_loss``, ``uses_eot`` and
    ``in_default_run`` (part of ``evaluate``'s default attack list).

    Args:
        model: logits classifier on [0, 1] images (put in eval mode).
        purifier: the defense (a :class:`~apudae_engine.backends.purifier.Purifier`) that
            defense-aware attacks target; library attacks ignore it.
        **settings: the :class:`AttackSpec` fields (``eps`` required; ``steps``, ``alpha``,
            ``seed``, ``eot``, ``loss``, ...).
    """

    name: ClassVar[str]
    label: ClassVar[str]
    norm: ClassVar[str] = "Linf"
    default_steps: ClassVar[int] = 1
    quick_steps: ClassVar[int | None] = None
    defense_aware: ClassVar[bool] = False
    iterative: ClassVar[bool] = False
    default_loss: ClassVar[str] = "ce"
    uses_eot: ClassVar[bool] = False
    in_default_run: ClassVar[bool] = True

    def __init_subclass__(cls, name: str | None = None, label: str | None = None,
                          **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if name is None:  # an intermediate base: not an attack of its own
            return
        if name in REGISTRY:
            raise TypeError(f"attack name {name!r} is registered twice: "
                            f"{REGISTRY[name].__qualname__} and {cls.__qualname__}")
        if cls.norm not in ("Linf", "L2"):
            raise TypeError(f"{cls.__qualname__}.norm must be Linf or L2, got {cls.norm!r}")
        cls.name, cls.label = name, label or name
        REGISTRY[name] = cls

    def __init__(self, model: nn.Module, purifier: Any = None, **settings: Any) -> None:
        self.model = model
        self.purifier = purifier
        self.spec = AttackSpec(self.name, **settings)
        if self.defense_aware and purifier is None:
            raise ValueError(f"{self.name} attacks a purifier; pass purifier=")
        self.budget: AttackBudget | None = None

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Adversarial images for (N, C, H, W) ``images`` in [0, 1] and (N,) ``labels``; sets
        ``self.budget``. The caller projects onto the eps-ball and [0, 1] afterwards."""
        raise NotImplementedError

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.run(images, labels).images

    def run(self, images: torch.Tensor, labels: torch.Tensor) -> AttackResult:
        """Craft adversarial examples for one batch: images within eps and [0, 1], and the
        budget spent (also left in ``self.budget``)."""
        self.model.eval()
        self.budget = None
        adv = self.forward(images, labels)
        if self.budget is None:
            raise RuntimeError(f"{type(self).__qualname__}.forward did not set self.budget")
        adv = project(adv.detach(), images, self.norm, self.spec.eps)
        return AttackResult(adv, self.budget)

    def new_budget(self, images: int, **counts: Any) -> AttackBudget:
        """A budget for this attack's settings; ``counts`` are AttackBudget fields."""
        s = self.spec
        return AttackBudget(self.name, self.norm, s.eps, s.steps,
                            s.eot if self.uses_eot else 1, images=images, **counts)


def run_attack(spec: AttackSpec, classifier: nn.Module, images: torch.Tensor,
               labels: torch.Tensor, purifier: Any = None) -> AttackResult:
    """Craft adversarial examples for one batch with the attack ``spec`` names.

    Args:
        spec: the attack and its budget.
        classifier: logits model on [0, 1] images (eval mode).
        images: (N, C, H, W) float in [0, 1]; labels: (N,) int64 true classes.
        purifier: the defense a defense-aware attack targets (required for those; library
            attacks ignore it and attack ``classifier`` alone).
    Returns: AttackResult with images within ``spec.eps`` (``spec.norm``) and in [0, 1].
    """
    return spec.build(classifier, purifier).run(images, labels)


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
    """Per-image loss to *maximise*: ``ce`` cross-entropy, ``margin`` max_{j!=y} z_j - z_y or
    ``dlr`` (:func:`dlr_loss`)."""
    if kind == "ce":
        return F.cross_entropy(logits, labels, reduction="none")
    if kind == "dlr":
        return dlr_loss(logits, labels)
    true = logits.gather(1, labels[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), -math.inf)
    return other.amax(dim=1) - true


def dlr_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Croce & Hein's difference-of-logits ratio, to maximise: (N, K >= 3) -> (N,).

    -(z_y - max_{j!=y} z_j) / (z_(1) - z_(3) + 1e-12) with z_(1) >= z_(2) >= z_(3) the sorted
    logits; invariant to shifting and scaling the logits. Example: logits (3, 1, 2, 0) with
    label 0 give -(3 - 2) / (3 - 1) = -0.5.
    """
    z_sorted, order = logits.sort(dim=1)
    z_y = logits.gather(1, labels[:, None]).squeeze(1)
    top_is_y = order[:, -1] == labels
    other = torch.where(top_is_y, z_sorted[:, -2], z_sorted[:, -1])
    return -(z_y - other) / (z_sorted[:, -1] - z_sorted[:, -3] + 1e-12)
