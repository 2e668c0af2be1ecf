"""Calibration: mu and sigma of the reconstruction error on held-out clean images.

The statistics are taken over every image of the calibration split, with no outlier
replacement (the authors' code replaced errors above 20 by 3 and used the test images
themselves; docs/method.md defect 2). The ``calib`` split of every dataset is disjoint from both
the training and the evaluation split.
"""

from __future__ import annotations

import logging
import math
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from apudae_engine.core.errors import UserError
from apudae_engine.images.datasets import load_dataset
from apudae_engine.method.checkpoint import load_checkpoint, update_metadata
from apudae_engine.method.detection import DEFAULT_FPR, fpr_table
from apudae_engine.method.purification import reconstruction_errors

log = logging.getLogger(__name__)


def calibrate(dae_path: str | Path, dataset: str = "fashion-mnist", limit: int | None = None,
              data_dir: str | None = None) -> dict[str, Any]:
    """Compute mu, sigma on the dataset's calib split and store them in the DAE checkpoint."""
    ckpt = load_checkpoint(dae_path, "dae")
    data = load_dataset(dataset, "calib", data_dir, ckpt.input_shape).subset(limit)
    if tuple(data.images.shape[1:]) != ckpt.input_shape:
        raise UserError(f"{data.source} images are {tuple(data.images.shape[1:])} but the DAE "
                        f"expects {ckpt.input_shape}")
    if len(data) < 2:
        raise UserError(f"{data.source}: need at least 2 images to calibrate")
    r = reconstruction_errors(ckpt.model, data.images).double()
    stats = {
        "mu": float(r.mean()), "sigma": float(r.std(unbiased=True)), "n": len(data),
        "data": data.source, "error": "per-image sum of squared error, images in [0, 1]",
        "quantiles": {q: float(torch.quantile(r, float(q))) for q in ("0.5", "0.95", "0.99")},
        # flagged = r above the threshold at flag_fpr (method.detection); --flag-fpr picks
        # another rate from this table.
        "flag_fpr": DEFAULT_FPR,
        "fpr_thresholds": fpr_table(r),
        "command": " ".join(shlex.quote(a) for a in ["apudae-engine", *sys.argv[1:]]),
    }
    if not math.isfinite(stats["mu"]) or not stats["sigma"] > 0:
        raise UserError(f"calibration gave mu={stats['mu']}, sigma={stats['sigma']}; the DAE "
                        "may be broken")
    update_metadata(ckpt.path, calibration=stats)
    log.info("calibrated %s on %s: mu=%.4f sigma=%.4f (n=%d)", ckpt.path, data.source,
             stats["mu"], stats["sigma"], stats["n"])
    tuned = (ckpt.meta.get("purify_defaults") or {}).get("tuning") or {}
    if tuned and (tuned.get("mu"), tuned.get("sigma")) != (stats["mu"], stats["sigma"]):
        log.warning("%s keeps purify_defaults tuned for mu=%s, sigma=%s; rerun `apudae-engine "
                    "tune --write` for this calibration", ckpt.path, tuned.get("mu"),
                    tuned.get("sigma"))
    return stats
