"""How far TF32 convolutions move the purified images, simulated on the CPU.

    python benchmarks/tf32_drift.py [--input engine/samples]

cuDNN's default for float32 convolutions on Ampere and later GPUs is TF32: inputs rounded to
a 10-bit mantissa, products summed in float32. This rounds the operands of every convolution
and transposed convolution of the DAE, in the forward pass and in the input gradient (the
gradient flowing into each one is rounded too), runs the reference adaptive purification with
and without the rounding, and prints the differences in the terms of ``apudae-engine verify``.
It is why the engine runs "fp32" as IEEE float32 on GPUs
(``apudae_engine.core.numerics.ieee_fp32_convolutions``).
"""

from __future__ import annotations

import argparse
import copy

import torch

from apudae_engine.method.checkpoint import load_checkpoint
from apudae_engine.method.config import PurifyConfig
from apudae_engine.method.purification import adaptive_purify
from apudae_engine.perf.verify import TOLERANCES, folder_images


def tf32(t: torch.Tensor) -> torch.Tensor:
    """float32 rounded to nearest (ties away from zero) at a 10-bit mantissa."""
    i = t.contiguous().view(torch.int32)
    return ((i + 0x1000) & ~0x1FFF).view(torch.float32)


class _RoundValue(torch.autograd.Function):
    """TF32 rounding of a convolution's input; the gradient passes through."""

    @staticmethod
    def forward(ctx, x):
        return tf32(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _RoundGradient(torch.autograd.Function):
    """Identity on a convolution's output; the gradient flowing into the convolution's
    backward (an operand of its input-gradient convolution) is TF32-rounded."""

    @staticmethod
    def forward(ctx, y):
        return y

    @staticmethod
    def backward(ctx, grad):
        return tf32(grad)


class TF32Conv(torch.nn.Module):
    """A Conv2d / ConvTranspose2d whose operands are TF32-rounded in both passes."""

    def __init__(self, conv: torch.nn.Module) -> None:
        super().__init__()
        self.conv = copy.deepcopy(conv)
        with torch.no_grad():
            self.conv.weight.copy_(tf32(self.conv.weight))

    def forward(self, x, **kwargs):  # kwargs: ConvTranspose2d's output_size
        return _RoundGradient.apply(self.conv(_RoundValue.apply(x), **kwargs))


def with_tf32_convs(model: torch.nn.Module) -> torch.nn.Module:
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for attr, sub in list(parent.named_children()):
            if isinstance(sub, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                setattr(parent, attr, TF32Conv(sub))
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="fmnist")
    p.add_argument("--input", default="engine/samples")
    a = p.parse_args()
    ck = load_checkpoint(a.model, "dae")
    cal = ck.calibration
    x = folder_images(a.input, ck.input_shape)
    dae = ck.model.eval()
    sim = with_tf32_convs(dae)
    ids = torch.arange(x.shape[0])
    ref = adaptive_purify(dae, x, cal["mu"], cal["sigma"], PurifyConfig(seed=0), ids)
    got = adaptive_purify(sim, x, cal["mu"], cal["sigma"], PurifyConfig(seed=0), ids)
    d = (ref.images - got.images).abs()
    tol = TOLERANCES["fp32"]
    print(f"TF32-rounded convolutions vs float32, {x.shape[0]} images of {a.input}, "
          f"model {a.model}, {PurifyConfig().steps} steps:")
    print(f"  max pixel diff     {float(d.max()):.3e}   "
          f"(fp32 tolerance {tol['max_abs_diff']:.3e})")
    print(f"  mean pixel diff    {float(d.mean()):.3e}   "
          f"(fp32 tolerance {tol['mean_abs_diff']:.0e})")
    print(f"  pixels off > 1/255 {float((d > 1 / 255).float().mean()):.2e}   "
          f"(fp32 tolerance {tol['frac_over_1_255']:.0e})")
    print(f"  r before max diff  {float((ref.error_before - got.error_before).abs().max()):.3e}")
    print(f"  active steps equal {torch.equal(ref.active_steps, got.active_steps)}")


if __name__ == "__main__":
    main()
