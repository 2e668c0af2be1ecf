"""The detection rule: when ``flagged`` marks an image as likely adversarial.

An image is flagged when its reconstruction error before purification exceeds a threshold.
By default the threshold is set from the clean calibration split at a chosen false-positive
rate (``flag_fpr``, 5 % unless the model's JSON says otherwise): ``calibrate`` stores the
errors' upper quantiles as a table of (false-positive rate, threshold), and rates between
two entries are interpolated linearly. ``flag_k`` instead gives the older rule
mu + k * sigma. Checkpoints calibrated before the table existed fall back to k = 3.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from apudae_engine.core.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_FPR = 0.05
LEGACY_K = 3.0
# The false-positive rates ``calibrate`` records thresholds for.
TABLE_FPRS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.15, 0.2,
              0.3, 0.5)


def fpr_table(errors: torch.Tensor) -> dict[str, float]:
    """{false-positive rate: threshold} on clean errors ``errors`` (N,): the (1 - rate)
    quantile, so that a share ``rate`` of the clean calibration images lies above it."""
    r = errors.double()
    return {f"{f:g}": float(torch.quantile(r, 1.0 - f)) for f in TABLE_FPRS}


def flag_threshold(calibration: dict[str, Any] | None, flag_fpr: float | None = None,
                   flag_k: float | None = None) -> float | None:
    """The error above which an image is flagged; None without calibration.

    Args:
        calibration: a DAE's calibration record (``mu``, ``sigma``, and ``fpr_thresholds``
            with ``flag_fpr`` when calibrated by this engine).
        flag_fpr: the false-positive rate on clean data to flag at (None: the record's
            ``flag_fpr``, else 5 %).
        flag_k: use mu + flag_k * sigma instead (an explicit choice wins).
    """
    if not calibration or calibration.get("mu") is None or calibration.get("sigma") is None:
        return None
    mu, sigma = float(calibration["mu"]), float(calibration["sigma"])
    if flag_k is not None:
        return mu + flag_k * sigma
    table = calibration.get("fpr_thresholds")
    if not table:
        if flag_fpr is not None:
            raise UserError("this DAE's calibration has no false-positive-rate table; rerun "
                            "`apudae-engine calibrate` on it, or use --flag-k")
        return mu + LEGACY_K * sigma
    fpr = float(flag_fpr if flag_fpr is not None else calibration.get("flag_fpr", DEFAULT_FPR))
    points = sorted((float(k), float(v)) for k, v in table.items())
    lo, hi = points[0][0], points[-1][0]
    if not lo <= fpr <= hi:
        raise UserError(f"--flag-fpr {fpr:g} is outside the calibrated range {lo:g} to {hi:g}")
    for (f0, t0), (f1, t1) in zip(points, points[1:]):
        if f0 <= fpr <= f1:
            return t0 + (t1 - t0) * (fpr - f0) / (f1 - f0) if f1 > f0 else t0
    return points[-1][1]  # fpr == hi
