"""The gradient through the unrolled adaptive loop without autograd's double backward.

Each purification step takes an Adam step with g = dL/dy at y = X + delta, where

    r(y) = || y - D(y) ||^2,        L = sum_images max(0, r - mu)^2 / sigma^2,
    grad r = 2 (I - J)^T e,         e = y - D(y),  J = dD/dy (per image),
    g = w(r) grad r,                w(r) = 2 max(0, r - mu) / sigma^2.

An attack differentiates through g: backward through a step needs, for the cotangent v of g,
the vector-Hessian product  v^T dg/dy = w'(r) (grad r . v) grad r + w(r) H v  with

    H = d(grad r)/dy = 2 (I - J)^T (I - J) - 2 sum_k e_k d^2 D_k / dy^2.

Autograd gets H v by differentiating the backward graph of grad r again (double backward).
For a DAE built from convolutions, ReLUs, eval-mode BatchNorm (affine: foldable into the
convolutions) and residual sums, D is piecewise linear: its second derivative is zero wherever
it is differentiable, i.e. everywhere except on the measure-zero set where some ReLU input is
exactly 0. There, H = 2 (I - J)^T (I - J), so

    H v = 2 (u - J^T u),   u = v - J v:

one Jacobian-vector product (forward mode) and one vector-Jacobian product through the DAE at
y. w'(r) = 2 / sigma^2 where r > mu, else 0 (the hinge's kink at r = mu is measure zero too).
The noise amplitude takes r without gradient (docs/method.md), so no other path leads through r.

:func:`adaptive_purify_hvp` runs the one loop (``method/loop.py``) with the step's gradient
taken by :class:`HingeGradient`, whose backward is the formula above. It equals the
reference's gradient wherever the DAE is piecewise linear (checked against autograd in float64
in ``tests/engine/method/test_fast_gradient.py``); for a DAE with smooth activations it
would drop the curvature term, so :func:`piecewise_linear` guards its use.

Example::

    out = adaptive_purify_hvp(dae, x.requires_grad_(), mu, sigma, config)
    (grad,) = torch.autograd.grad(loss(classifier(out)), x)
"""

from __future__ import annotations

import torch
from torch import nn

from apudae_engine.method.config import PurifyConfig
from apudae_engine.method.loop import PurifyResult, calibration, keyed_update, run_loop
from apudae_engine.method.purification import checked_image_ids
from apudae_kernels.reference import hinge_weight_ref, squared_error_ref

# Modules after which D stays piecewise linear (BatchNorm only in eval mode).
_PIECEWISE_LINEAR = (nn.Conv2d, nn.ConvTranspose2d, nn.ReLU, nn.BatchNorm2d, nn.Identity,
                     nn.Sequential, nn.ModuleList, nn.Linear)


def piecewise_linear(dae: nn.Module) -> bool:
    """True when every sub-module of ``dae`` keeps it piecewise linear (convolutions, ReLU,
    eval-mode BatchNorm, containers); the REDNet's functional ReLU and residual sums are too."""
    for m in dae.modules():
        if m is dae:
            continue
        if not isinstance(m, _PIECEWISE_LINEAR):
            return False
        if isinstance(m, nn.BatchNorm2d) and m.training:
            return False
    return True


def reconstruction_jvp(dae: nn.Module, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """J v with J = dD/dy at y (forward mode): (N, C, H, W) -> (N, C, H, W)."""
    return torch.func.jvp(dae, (y,), (v,))[1]


class HingeGradient(torch.autograd.Function):
    """(y, dae, mu, sigma, hinge) -> (g, r): the step's gradient g = w(r) grad r and the error
    r. ``hinge=False`` gives the iterative method's w = 1. Backward is the JVP/VJP formula of
    the module docstring (exact where the DAE is piecewise linear)."""

    @staticmethod
    def forward(ctx, y, dae, mu, sigma, hinge):
        with torch.enable_grad():
            yr = y.detach().requires_grad_(True)
            recon = dae(yr)
            r = squared_error_ref(yr, recon)
            (grad_r,) = torch.autograd.grad(r.sum(), yr)
        r = r.detach()
        w = hinge_weight_ref(r, mu, sigma) if hinge else torch.ones_like(r)
        g = w.to(y.dtype).view(-1, *[1] * (y.dim() - 1)) * grad_r
        ctx.save_for_backward(y.detach(), grad_r, r)
        ctx.dae, ctx.mu, ctx.sigma, ctx.hinge = dae, mu, sigma, hinge
        ctx.mark_non_differentiable(r)
        return g, r

    @staticmethod
    def backward(ctx, g_bar, _r_bar):
        y, grad_r, r = ctx.saved_tensors
        dae, mu, sigma = ctx.dae, ctx.mu, ctx.sigma
        shape = (-1, *[1] * (y.dim() - 1))
        if ctx.hinge:
            w = hinge_weight_ref(r, mu, sigma).to(y.dtype)
            # Python scalars in torch.where would round 2 / sigma^2 to float32.
            dw = (r > mu).to(y.dtype) * (2.0 / (sigma * sigma))
        else:
            w, dw = torch.ones_like(r, dtype=y.dtype), torch.zeros_like(r, dtype=y.dtype)
        rows = w != 0  # an image below mu has g = 0 whatever y does: nothing to propagate
        y_bar = (dw * (grad_r * g_bar).flatten(1).sum(1)).view(shape) * grad_r
        if rows.any():
            ya, va = y[rows], g_bar[rows]
            u = va - reconstruction_jvp(dae, ya, va)
            with torch.enable_grad():
                yr = ya.detach().requires_grad_(True)
                (jtu,) = torch.autograd.grad(dae(yr), yr, u)
            y_bar[rows] = y_bar[rows] + 2.0 * w[rows].view(shape) * (u - jtu)
        return y_bar, None, None, None, None


def hvp_purify(dae: nn.Module, x: torch.Tensor, mu: float | None, sigma: float | None,
               config: PurifyConfig, image_ids: torch.Tensor | None = None) -> PurifyResult:
    """The adaptive (or iterative) loop of ``method/loop.py`` with :class:`HingeGradient` as
    its step, differentiable without double backward.

    Same arguments as ``adaptive_purify``; ``config.method`` must be ``adaptive`` or
    ``iterative``. Forward values equal the reference's (the same ops in the same order).
    """
    if config.method not in ("adaptive", "iterative"):
        raise ValueError(f"no loop to differentiate for method {config.method!r}")
    hinge = config.method == "adaptive"
    mu, sigma = calibration(config, mu, sigma)
    ids = checked_image_ids(x, image_ids) if hinge and config.noise else image_ids

    def step(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g, r = HingeGradient.apply(y, dae, mu, sigma, hinge)
        return r, g

    update = keyed_update(config, mu, sigma, ids, hinge=False)
    return run_loop(x, config.steps, mu if hinge else None, step, update, config.clip)


def adaptive_purify_hvp(dae: nn.Module, x: torch.Tensor, mu: float, sigma: float,
                        config: PurifyConfig, image_ids: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """The purified images (N, C, H, W) of :func:`hvp_purify`."""
    return hvp_purify(dae, x, mu, sigma, config, image_ids).images
