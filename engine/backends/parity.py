"""How close a fast backend must stay to the reference, and the checks that hold it there.

``TOLERANCES`` are ``apudae-engine verify``'s bounds per precision (why they are what they are:
``apudae_engine.perf.verify``). :func:`first_batch_check` applies them to the first few images
a non-reference backend purifies in a run; :func:`check_precision_parity` gates reduced
precision on the step graph before the first batch.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from apudae_engine.core.errors import UserError

log = logging.getLogger(__name__)

TOLERANCES = {
    "fp32": {"max_abs_diff": 8.0 / 255, "mean_abs_diff": 1e-5, "frac_over_1_255": 1e-3,
             "label_agreement": 0.99},
    "bf16": {"max_abs_diff": None, "mean_abs_diff": 5e-3, "frac_over_1_255": None,
             "label_agreement": 0.98},
    "fp16": {"max_abs_diff": None, "mean_abs_diff": 5e-3, "frac_over_1_255": None,
             "label_agreement": 0.98},
}
# Images of a run's first batch rerun on the reference before the fast backend is trusted.
FIRST_BATCH_IMAGES = 8
# Reduced precision must keep the step close to float32 on the first batch (up to 64 images):
# the median relative error of r and the mean cosine similarity of dr/dy against the float32
# graph (typical bf16 values for the fmnist DAE: 0.3 % and 0.996).
PARITY = {"r_rel_err_median": 0.01, "grad_cosine_mean": 0.98}


def pixel_differences(ref: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    """Max and mean absolute difference and the share of values more than 1/255 apart."""
    if not ref.numel():
        return {"max_abs_diff": 0.0, "mean_abs_diff": 0.0, "frac_over_1_255": 0.0}
    diff = (ref.float() - got.float()).abs()
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "frac_over_1_255": float((diff > 1.0 / 255).float().mean())}


def over_tolerance(stats: dict[str, float], precision: str) -> list[str]:
    """The statistics of ``stats`` beyond ``TOLERANCES[precision]``, as readable lines."""
    out = []
    for key, bound in TOLERANCES[precision].items():
        value = stats.get(key)
        if bound is None or value is None:
            continue
        # NaN is beyond every bound (a plain comparison would let it pass)
        bad = not (value >= bound) if key == "label_agreement" else not (value <= bound)
        if bad:
            out.append(f"{key} {value:.3g} beyond {bound:.3g}")
    return out


def first_batch_check(ref, got, precision: str) -> dict:
    """Compare a fast backend's results ``got`` with the reference's ``ref`` (PurifyResults of
    the same images): pixel differences, the largest difference of r before purification,
    and ``failures`` (empty when within ``TOLERANCES[precision]``)."""
    stats = pixel_differences(ref.images, got.images)
    stats["images"] = int(ref.images.shape[0])
    stats["error_before_max_diff"] = float((ref.error_before - got.error_before.float()).abs()
                                           .max()) if ref.images.numel() else 0.0
    stats["failures"] = over_tolerance(stats, precision)
    return stats


@torch.no_grad()
def check_precision_parity(dae: nn.Module, probe: torch.Tensor, dtype: torch.dtype) -> dict:
    """Compare the step graph in ``dtype`` with float32 on ``probe`` images; raise UserError
    when r or the gradient direction is further off than ``PARITY`` allows."""
    from apudae_engine.backends.step_graph import StepGraph

    r32, g32 = StepGraph(dae, torch.float32).to(probe.device)(probe.float())
    r16, g16 = StepGraph(dae, dtype).to(probe.device)(probe.float())
    rel = (r16 - r32).abs() / r32.abs().clamp_min(1e-6)
    cos = torch.nn.functional.cosine_similarity(g16.flatten(1), g32.flatten(1), dim=1)
    stats = {"r_rel_err_median": float(rel.median()), "r_rel_err_max": float(rel.max()),
             "grad_cosine_mean": float(cos.mean()), "grad_cosine_min": float(cos.min())}
    name = str(dtype).removeprefix("torch.")
    summary = (f"median relative r error {stats['r_rel_err_median']:.2g} (max "
               f"{stats['r_rel_err_max']:.2g}), mean gradient cosine "
               f"{stats['grad_cosine_mean']:.4f} (min {stats['grad_cosine_min']:.3f})")
    if (stats["r_rel_err_median"] > PARITY["r_rel_err_median"]
            or stats["grad_cosine_mean"] < PARITY["grad_cosine_mean"]):
        raise UserError(f"{name} is not accurate enough for this DAE against float32 on the "
                        f"first batch ({summary}); use --precision fp32")
    log.info("%s parity on the first batch: %s", name, summary)
    return stats
