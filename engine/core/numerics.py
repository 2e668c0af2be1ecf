"""The engine's float32 policy: "fp32" means IEEE float32 on every device, never TF32."""

from __future__ import annotations

import contextlib

import torch


def conv_fp32_precision() -> str:
    """How cuDNN runs float32 convolutions now: "tf32" or "ieee"."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    precision = getattr(conv, "fp32_precision", None)
    if precision in (None, "none"):  # torch before 2.9, or the global default in charge
        with contextlib.suppress(RuntimeError):
            precision = "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"
    return precision or "unknown"


@contextlib.contextmanager
def ieee_fp32_convolutions(device: torch.device | str):
    """Within the block, cuDNN runs float32 convolutions in IEEE float32, not TF32.

    PyTorch's default on Ampere and later GPUs is TF32 (a 10-bit mantissa). Adam's steps have
    the same size whatever the gradient's magnitude, so TF32's rounding grows over the loop:
    simulated on the bundled model (benchmarks/tf32_drift.py), the mean pixel difference to
    float32 was 4.7e-4 and 2.4 % of pixels moved by more than 1/255, beyond the fp32 verify
    tolerances. So "fp32" in this engine means IEEE float32 on every device; bf16/fp16 are the
    reduced precisions. The previous setting is restored on exit.
    """
    if torch.device(device).type != "cuda":
        yield
        return
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9
        old = conv.fp32_precision
        conv.fp32_precision = "ieee"
        try:
            yield
        finally:
            conv.fp32_precision = old
        return
    cudnn = torch.backends.cudnn
    with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark,
                     deterministic=cudnn.deterministic, allow_tf32=False):
        yield
