"""Per-image outcomes of an evaluation's input rows, and their form in a batch's part file.

A :class:`Row` holds one input row's outcomes (correct flags per defense, reconstruction
errors, perturbation norms, held-out draw counts, the attack's budget, seconds, example
images) for one batch or, after :func:`merge_rows`, for all of a table's batches in order.
:func:`rows_to_part` and :func:`rows_from_part` turn a batch's rows into JSON-ready metadata
and numpy arrays and back, losslessly, so a table built from part files equals one built in
memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from apudae_engine.evaluation.attacks import AttackBudget


@dataclass
class Row:
    """Per-image outcomes of one input row, accumulated over batches."""

    name: str
    norm: str | None = None
    eps: float | None = None
    correct: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    errors: list[torch.Tensor] = field(default_factory=list)
    norms: list[torch.Tensor] = field(default_factory=list)
    budget: AttackBudget | None = None
    attack_seconds: float = 0.0
    attack_cpu_seconds: float = 0.0  # CPU time of the process (all threads) while crafting
    defense_seconds: dict[str, float] = field(default_factory=dict)
    examples: dict[str, torch.Tensor] = field(default_factory=dict)
    # Defense-aware rows: per image, held-out noise draws of the target classified correctly.
    draw_correct: list[torch.Tensor] = field(default_factory=list)

    def cat(self) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor | None]:
        correct = {d: torch.cat(v) for d, v in self.correct.items()}
        return correct, torch.cat(self.errors), torch.cat(self.norms) if self.norms else None


def row_arrays(row: Row, prefix: str) -> dict[str, np.ndarray]:
    """A row's per-image outcomes as arrays keyed ``prefix/error``, ``prefix/norm``,
    ``prefix/correct/<defense>`` and ``prefix/draws`` (part files and per_image.npz)."""
    correct, errors, norms = row.cat()
    arrays = {f"{prefix}/error": errors.numpy()}
    if norms is not None:
        arrays[f"{prefix}/norm"] = norms.numpy()
    for d, v in correct.items():
        arrays[f"{prefix}/correct/{d}"] = v.numpy()
    if row.draw_correct:
        arrays[f"{prefix}/draws"] = torch.cat(row.draw_correct).numpy()
    return arrays


def budget_from_dict(d: dict[str, Any]) -> AttackBudget:
    """The :class:`AttackBudget` whose ``to_dict()`` gave ``d`` (its ``per_image`` dropped)."""
    return AttackBudget(**{f.name: d[f.name] for f in fields(AttackBudget) if f.name in d})


def rows_to_part(rows: list[Row]) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """A batch's rows as JSON-ready metadata (one dict per row) and arrays keyed ``i/...``."""
    meta, arrays = [], {}
    for i, row in enumerate(rows):
        meta.append({"name": row.name, "norm": row.norm, "eps": row.eps,
                     "budget": None if row.budget is None else row.budget.to_dict(),
                     "attack_seconds": row.attack_seconds,
                     "attack_cpu_seconds": row.attack_cpu_seconds,
                     "defense_seconds": row.defense_seconds,
                     "defenses": list(row.correct), "examples": list(row.examples)})
        arrays.update(row_arrays(row, str(i)))
        for d, v in row.examples.items():
            arrays[f"{i}/examples/{d}"] = v.numpy()
    return meta, arrays


def rows_from_part(meta: list[dict[str, Any]], arrays: dict[str, np.ndarray],
                   size: int) -> list[Row]:
    """Inverse of :func:`rows_to_part`; ValueError when an array is missing or not ``size``
    images long (a damaged or foreign part)."""
    def get(key: str) -> torch.Tensor:
        if key not in arrays:
            raise ValueError(f"no array {key}")
        a = torch.from_numpy(np.array(arrays[key]))
        if key.split("/")[1] != "examples" and a.shape[:1] != (size,):
            raise ValueError(f"{key} holds {tuple(a.shape)}, expected {size} images")
        return a

    rows = []
    for i, m in enumerate(meta):
        rows.append(Row(
            m["name"], m["norm"], m["eps"],
            correct={d: [get(f"{i}/correct/{d}")] for d in m["defenses"]},
            errors=[get(f"{i}/error")],
            norms=[get(f"{i}/norm")] if f"{i}/norm" in arrays else [],
            budget=None if m["budget"] is None else budget_from_dict(m["budget"]),
            attack_seconds=float(m["attack_seconds"]),
            attack_cpu_seconds=float(m.get("attack_cpu_seconds", 0.0)),  # older parts: none
            defense_seconds={d: float(s) for d, s in m["defense_seconds"].items()},
            examples={d: get(f"{i}/examples/{d}") for d in m["examples"]},
            draw_correct=[get(f"{i}/draws")] if f"{i}/draws" in arrays else []))
    return rows


def merge_rows(batches: list[list[Row]]) -> list[Row]:
    """One table's rows from its batches' rows, in batch order: outcomes concatenated,
    budgets merged, seconds summed, examples from the first batch that holds them."""
    out = [Row(r.name, r.norm, r.eps) for r in batches[0]] if batches else []
    for rows in batches:
        for acc, row in zip(out, rows, strict=True):
            for d, v in row.correct.items():
                acc.correct.setdefault(d, []).extend(v)
            acc.errors += row.errors
            acc.norms += row.norms
            acc.draw_correct += row.draw_correct
            if row.budget is not None:
                acc.budget = (budget_from_dict(row.budget.to_dict()) if acc.budget is None
                              else acc.budget.merge(row.budget))
            acc.attack_seconds += row.attack_seconds
            acc.attack_cpu_seconds += row.attack_cpu_seconds
            for d, s in row.defense_seconds.items():
                acc.defense_seconds[d] = acc.defense_seconds.get(d, 0.0) + s
            if not acc.examples:
                acc.examples = dict(row.examples)
    return out
