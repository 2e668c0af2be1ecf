"""Adversarial attacks, one registered class each: oblivious library attacks and defense-aware ones.

- :mod:`.base`: the :class:`Attack` base class and its registry, :class:`AttackSpec`,
  :class:`AttackBudget`, :func:`run_attack` and the shared helpers.
- :mod:`.library`: *oblivious* attacks from a library, crafted on whatever model they are given,
  usually the bare classifier (the authors' setting).
- :mod:`.aware`: *defense-aware* attacks on classifier(purify(x)), written here because no
  library has them.

Every module of this package is imported here, so a new attack is one class in one file
(an existing module or a new one beside them); ``evaluate`` and its CLI read the registry.

Example::

    spec = AttackSpec("pgd", eps=0.1, steps=40)
    result = run_attack(spec, classifier, images, labels)
    aware = run_attack(AttackSpec("pgd-eot", eps=0.1, steps=20, eot=4), classifier, images,
                       labels, purifier=purifier)
"""

from __future__ import annotations

import importlib
import pkgutil

from apudae_engine.evaluation.attacks import aware, library
from apudae_engine.evaluation.attacks.base import (
    Attack,
    AttackBudget,
    AttackResult,
    AttackSpec,
    attack_class,
    attack_names,
    classifier_loss,
    perturbation_norm,
    project,
    run_attack,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

LIBRARY_ATTACKS = attack_names(defense_aware=False)
DEFENSE_AWARE_ATTACKS = attack_names(defense_aware=True)
ATTACKS = LIBRARY_ATTACKS + DEFENSE_AWARE_ATTACKS

__all__ = ["ATTACKS", "DEFENSE_AWARE_ATTACKS", "LIBRARY_ATTACKS", "Attack", "AttackBudget",
           "AttackResult", "AttackSpec", "attack_class", "attack_names", "aware",
           "classifier_loss", "library", "perturbation_norm", "project", "run_attack"]
