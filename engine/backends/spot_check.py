"""``purify --verify-every N``: the reference rerun on every N-th batch, beside a fast backend."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from apudae_engine.method.purification import PurifyResult

log = logging.getLogger(__name__)


@dataclass
class SpotCheck:
    """Rerun the reference on every ``every``-th batch and record the largest pixel
    difference; differences above ``tolerance`` are logged as warnings.

    Example (in the folder pipeline)::

        check = SpotCheck(every=job.verify_every)
        check(batch_index, purifier, x, ids, result)   # after purifier.purify(x, ids)
    """

    every: int = 0
    tolerance: float = 8.0 / 255  # see perf.verify.TOLERANCES (fp32)
    records: list[dict] = field(default_factory=list)

    def __call__(self, batch_index: int, purifier, x: torch.Tensor, ids: torch.Tensor,
                 result: PurifyResult) -> dict | None:
        if self.every <= 0 or batch_index % self.every:
            return None
        ref = purifier.reference(x, ids)
        diff = (ref.images - result.images).abs()
        rec = {"batch": batch_index, "images": int(x.shape[0]),
               "max_abs_diff": float(diff.max()) if diff.numel() else 0.0,
               "mean_abs_diff": float(diff.mean()) if diff.numel() else 0.0,
               "error_before_max_diff": float((ref.error_before - result.error_before).abs()
                                              .max()) if diff.numel() else 0.0}
        self.records.append(rec)
        level = logging.WARNING if rec["max_abs_diff"] > self.tolerance else logging.INFO
        log.log(level, "verify batch %d: max pixel diff %.2e (tolerance %.2e), mean %.2e",
                batch_index, rec["max_abs_diff"], self.tolerance, rec["mean_abs_diff"])
        return rec

    @property
    def worst(self) -> float:
        return max((r["max_abs_diff"] for r in self.records), default=0.0)
