"""Settings of an evaluation run: which attacks, defenses, images and budgets.

Epsilons follow each dataset's conventions unless given: 28x28 grey data (Fashion-MNIST,
MNIST) L-inf 0.1 and L2 1.5, CIFAR-10 L-inf 8/255 and L2 0.5. ``quick`` shrinks everything to
a CI-sized smoke run. Defense-aware rows are also scored on ``draws`` held-out noise seeds of
the target defense (mean over the draws, and correct on all of them); the APGD attacks check
their iterates on ``draws`` other seeds and restart ``restarts`` times.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field, replace

from apudae_engine.core.choices import DEFENSES  # evaluate's columns; re-exported here
from apudae_engine.core.errors import UserError
from apudae_engine.evaluation.attacks import AttackSpec, attack_class, attack_names

# What --aware-sweep crafts against by default, each in turn (--method-defaults gives the
# adaptive target the method's own settings instead of the model's tuned ones).
AWARE_TARGETS = ("none", "direct", "adaptive")
# (L-inf eps, L2 eps, L-inf sweep) by dataset, following the field's conventions.
EPSILONS = {"fashion-mnist": (0.1, 1.5, (0.05, 0.1, 0.2, 0.3)),
            "mnist": (0.1, 1.5, (0.05, 0.1, 0.2, 0.3)),
            "cifar10": (8 / 255, 0.5, (2 / 255, 4 / 255, 8 / 255, 16 / 255))}


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation run; ``apudae-engine evaluate --help`` describes each field.

    None fields take the dataset's conventions (eps) or the mode's defaults (``quick``: 32
    images, 8 for defense-aware attacks, 32 for the eps sweep, small step counts, one EOT
    draw, 100 Square queries).
    """

    model: str = "fmnist"
    classifier: str | None = None
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    split: str = "test"
    limit: int | None = None
    offset: int = 0
    attacks: tuple[str, ...] = field(
        default_factory=lambda: attack_names(defense_aware=False, default_only=True))
    aware_attacks: tuple[str, ...] = field(
        default_factory=lambda: attack_names(defense_aware=True, default_only=True))
    aware_limit: int | None = None
    aware_target: str = "adaptive"
    aware_sweep: tuple[float, ...] = ()
    aware_targets: tuple[str, ...] = AWARE_TARGETS
    defenses: tuple[str, ...] = DEFENSES
    eps: float | None = None
    eps_l2: float | None = None
    sweep: tuple[float, ...] | None = None
    sweep_limit: int | None = None
    steps: int | None = None
    aware_steps: int | None = None
    eot: int | None = None
    draws: int = 4
    restarts: int = 1
    square_queries: int | None = None
    batch_size: int = 250
    aware_batch_size: int = 32
    seed: int = 0
    quick: bool = False
    device: str = "cpu"
    backend: str = "reference"
    method_defaults: bool = False
    out_dir: str = "runs/eval"
    examples: int = 8
    command: str | None = None

    def __post_init__(self) -> None:
        library, aware = attack_names(defense_aware=False), attack_names(defense_aware=True)
        unknown = [a for a in self.attacks if a not in library]
        unknown += [a for a in self.aware_attacks if a not in aware]
        unknown += [d for d in (*self.defenses, *self.aware_targets) if d not in DEFENSES]
        if unknown:
            raise UserError(f"unknown attack or defense {', '.join(unknown)}; attacks: "
                            f"{', '.join(library)}; defense-aware: "
                            f"{', '.join(aware)}; defenses: {', '.join(DEFENSES)}")
        if self.split == "calib":
            raise UserError("the calib split holds the data mu/sigma were computed on; evaluate "
                            "on --split test")
        if self.aware_attacks and self.aware_target not in DEFENSES[1:]:
            raise UserError(f"--aware-target must be a purifying defense "
                            f"({', '.join(DEFENSES[1:])}), got {self.aware_target!r}")
        if self.aware_sweep and not (self.aware_attacks and self.aware_targets):
            raise UserError("--aware-sweep needs defense-aware attacks and --aware-targets")
        missing = [t for t in self.aware_targets if self.aware_sweep and t not in self.defenses]
        if missing:  # the curve reads each target's own column
            raise UserError(f"--aware-targets {', '.join(missing)} must be among --defenses "
                            f"({', '.join(self.defenses)})")
        if any(not e > 0 for e in self.aware_sweep):
            raise UserError(f"--aware-sweep values must be positive, got {self.aware_sweep}")
        for name in ("limit", "aware_limit", "sweep_limit", "steps", "aware_steps", "eot",
                     "square_queries", "draws", "restarts"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.batch_size < 1 or self.aware_batch_size < 1:
            raise UserError("batch sizes must be at least 1")
        # Attack seeds are keyed by the batch's index in the whole split, so a split run gives
        # each image the seed one long run would: its images must start a batch.
        if self.offset < 0 or self.offset % self.batch_size or (
                self.aware_attacks and self.offset % self.aware_batch_size):
            raise UserError(f"--offset must be a non-negative multiple of --batch and "
                            f"--aware-batch, got {self.offset}")

    def resolved(self) -> EvalConfig:
        """Fill the None fields from the dataset's conventions and the mode's defaults."""
        eps, eps_l2, sweep = EPSILONS.get(self.dataset, (None, None, ()))
        if (self.eps or eps) is None or (self.eps_l2 or eps_l2) is None:
            raise UserError(f"no epsilon convention for dataset {self.dataset!r}; give --eps "
                            "and --eps-l2")
        q = self.quick
        return replace(
            self, eps=self.eps or eps, eps_l2=self.eps_l2 or eps_l2,
            sweep=self.sweep if self.sweep is not None else (
                sweep[:3] if q else sweep),
            # Quick: about two minutes on a shared 2-core CPU (each row scores every defense,
            # and iterative/adaptive purification costs ~13 DAE passes forward and back).
            limit=self.limit or (32 if q else None),
            aware_limit=self.aware_limit or (8 if q else 500),
            sweep_limit=self.sweep_limit or (min(self.limit or 32, 32) if q else 1000),
            eot=self.eot or (1 if q else 4),
            square_queries=self.square_queries or (100 if q else 5000),
            command=self.command or " ".join(shlex.quote(a) for a in ["apudae-engine",
                                                                      *sys.argv[1:]]))

    def attack_spec(self, name: str, eps: float | None = None) -> AttackSpec:
        """Attack ``name`` under this run's budgets (``eps`` replaces the threat model's)."""
        cls = attack_class(name)
        aware = cls.defense_aware
        steps = None
        if cls.iterative:
            steps = self.aware_steps if aware else self.steps
        if steps is None and self.quick:
            steps = cls.quick_steps
        default_eps = self.eps_l2 if cls.norm == "L2" else self.eps
        return AttackSpec(name, eps=eps or default_eps, steps=steps, seed=self.seed,
                          eot=self.eot if aware else 1, square_queries=self.square_queries,
                          draws=self.draws, restarts=self.restarts)
