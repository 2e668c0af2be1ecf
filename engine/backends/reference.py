"""The ``reference`` backend: the specification (``method.purification``) in IEEE float32.

It runs everywhere and is what every other backend is checked against. With
``differentiable=True`` it is the only path that keeps the loop on the autograd graph, either
by double backward (``gradient="autograd"``) or with the JVP/VJP step of
``method.fast_gradient`` (``gradient="hvp"``, exact for a piecewise-linear DAE; ``auto``
takes it where it is exact).
"""

from __future__ import annotations

import torch

from apudae_engine.core.numerics import ieee_fp32_convolutions
from apudae_engine.method.loop import PurifyResult
from apudae_engine.method.purification import purify

GRADIENTS = ("auto", "autograd", "hvp")


def unavailable_reason(device: torch.device, precision: str) -> str | None:
    """None where the reference runs (everywhere, in float32), else why not."""
    if precision != "fp32":
        return ("the reference backend is the float32 specification; use --precision fp32 "
                "or --backend compiled")
    return None


class ReferenceBackend:
    """Eager PyTorch with autograd: ``method.purification.purify``, in IEEE float32."""

    name, precision = "reference", "fp32"

    def purify(self, dae, x, mu, sigma, config, image_ids=None, differentiable: bool = False,
               gradient: str = "autograd") -> PurifyResult:
        """``differentiable``: keep the graph from the purified images back to ``x``, by
        ``gradient`` (one of ``GRADIENTS``)."""
        if gradient not in GRADIENTS:
            raise ValueError(f"gradient must be one of {', '.join(GRADIENTS)}, got "
                             f"{gradient!r}")
        with ieee_fp32_convolutions(x.device):
            if not differentiable:
                with torch.no_grad():
                    return purify(dae, x, config, mu, sigma, image_ids)
            if gradient != "autograd" and config.method != "direct":
                from apudae_engine.method.fast_gradient import hvp_purify, piecewise_linear

                if gradient == "hvp" or piecewise_linear(dae):
                    return hvp_purify(dae, x, mu, sigma, config, image_ids)
            return purify(dae, x, config, mu, sigma, image_ids, True)

    def report(self) -> dict:
        """What ran: ``{"backend", "precision", "fallback"}`` (see OptimizedBackend.report)."""
        return {"backend": self.name, "precision": self.precision, "fallback": None}
