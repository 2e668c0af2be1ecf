"""The reference purifiers: eager PyTorch with autograd. This module is the specification.

Three methods from docs/method.md: ``direct`` (x' = D(x)), ``iterative`` (Adam on the summed
reconstruction error) and ``adaptive`` (APuDAE: hinge loss against calibrated mu/sigma, with
per-image noise scaled by how abnormal the error is). Every optimized backend is tested against
these functions.

All functions take NCHW float tensors in [0, 1]. Nothing is updated in place, so with
``differentiable=True`` gradients flow from the purified images back to the inputs through
every Adam step and DAE pass (the defense-aware attacks use this).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from apudae_engine.method.config import PurifyConfig
from apudae_engine.method.loop import (
    PurifyResult,
    Step,
    calibration,
    keyed_update,
    run_loop,
)
from apudae_kernels.reference import MASK32, mix32, squared_error_ref

__all__ = ["PurifyResult", "adaptive_purify", "direct_purify", "image_fingerprint",
           "iterative_purify", "purify", "reconstruction_error", "reconstruction_errors"]


def reconstruction_error(dae: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """r(x) = sum over channels and pixels of (x - D(x))^2: (N, C, H, W) -> (N,)."""
    return squared_error_ref(x, dae(x))


@torch.no_grad()
def reconstruction_errors(dae: nn.Module, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """r for a whole set of uint8 or float images (N, C, H, W), in batches: (N,).

    The statistic calibration takes mu and sigma of (uint8 images are scaled to [0, 1]).
    """
    out = []
    for i in range(0, images.shape[0], batch):
        x = images[i:i + batch]
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        out.append(reconstruction_error(dae, x))
    return torch.cat(out)


def image_fingerprint(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit identity per image computed from its pixels (quantised to 16 bits): (N,) int64.

    Used as the default image identity for noise, so that an image's purification does not
    depend on which batch it is in or where.
    """
    q = torch.round(x.detach().float().clamp(0, 1) * 65535).to(torch.int64).flatten(1)
    pos = mix32(torch.arange(q.shape[1], device=q.device, dtype=torch.int64))
    h = mix32((q ^ pos.unsqueeze(0)) & MASK32).sum(dim=1) & MASK32
    return mix32(h)


def direct_purify(dae: nn.Module, x: torch.Tensor, config: PurifyConfig) -> PurifyResult:
    """Variant A: x' = D(x)."""
    recon = dae(x)
    r = squared_error_ref(x, recon)
    out = recon.clamp(0, 1) if config.clip else recon
    return PurifyResult(out, r.detach(), torch.zeros_like(r, dtype=torch.int64))


def autograd_step(dae: nn.Module, loss: Callable[[torch.Tensor], torch.Tensor],
                  differentiable: bool) -> Step:
    """The reference's step: y -> (r(y), dL/dy) by autograd, with L = ``loss(r)`` summed over
    the batch. ``differentiable`` keeps the graph (double backward for attacks); otherwise
    neither output carries one."""

    def step(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            if not differentiable:
                y = y.detach().requires_grad_(True)
            r = squared_error_ref(y, dae(y))
            (g,) = torch.autograd.grad(loss(r), y, create_graph=differentiable)
        return r.detach(), g

    return step


def iterative_purify(
    dae: nn.Module, x: torch.Tensor, config: PurifyConfig, differentiable: bool = False
) -> PurifyResult:
    """Variant B: ``steps`` Adam steps on delta lowering sum_batch r(x + delta)."""
    if not differentiable:
        x = x.detach()
    step = autograd_step(dae, torch.sum, differentiable)
    update = keyed_update(config, None, None, torch.zeros(0, dtype=torch.int64), hinge=False)
    return run_loop(x, config.steps, None, step, update, config.clip)


def adaptive_purify(
    dae: nn.Module,
    x: torch.Tensor,
    mu: float,
    sigma: float,
    config: PurifyConfig,
    image_ids: torch.Tensor | None = None,
    differentiable: bool = False,
) -> PurifyResult:
    """Variant C, APuDAE (``method.loop``): for t = 1..T, with X = x and delta = 0 at the
    start:

    y = X + delta; r = r(y); a = eps_n * clip(((r - mu) / (2 sigma))^2, 0, max_scale)
    (no gradient); X += a * U with U uniform in [-1, 1) keyed by (seed, image id, t);
    L = sum_batch max(0, r - mu)^2 / sigma^2; Adam step on delta with dL/dy at y.
    Returns clamp(X + delta, 0, 1) (no clamp with ``config.clip=False``).

    Args:
        dae: eval-mode denoiser.
        x: (N, C, H, W) images in [0, 1].
        mu, sigma: calibration statistics of r on clean data (``config.sigma_override``
            replaces sigma).
        image_ids: (N,) int64 identities keying the noise; default ``image_fingerprint(x)``.
        differentiable: keep the graph through every step (for attacks); slower.
    """
    config.require_seed()
    mu, sigma = calibration(config, mu, sigma)
    ids = checked_image_ids(x, image_ids)
    if not differentiable:
        x = x.detach()
    step = autograd_step(dae, lambda r: (torch.clamp(r - mu, min=0.0) ** 2).sum()
                         / (sigma * sigma), differentiable)
    update = keyed_update(config, mu, sigma, ids, hinge=False)
    return run_loop(x, config.steps, mu, step, update, config.clip)


def checked_image_ids(x: torch.Tensor, image_ids: torch.Tensor | None) -> torch.Tensor:
    """(N,) int64 noise identities on ``x``'s device: ``image_ids``, or the pixel fingerprints
    of ``x`` when None; a ValueError when the shape is not (N,)."""
    n = x.shape[0]
    ids = image_fingerprint(x) if image_ids is None else image_ids
    ids = ids.to(device=x.device, dtype=torch.int64)
    if ids.shape != (n,):
        raise ValueError(f"image_ids must have shape ({n},), got {tuple(ids.shape)}")
    return ids


def purify(
    dae: nn.Module,
    x: torch.Tensor,
    config: PurifyConfig,
    mu: float | None = None,
    sigma: float | None = None,
    image_ids: torch.Tensor | None = None,
    differentiable: bool = False,
) -> PurifyResult:
    """Run the method named by ``config.method`` (mu/sigma are needed for ``adaptive``)."""
    if config.method == "direct":
        return direct_purify(dae, x, config)
    if config.method == "iterative":
        return iterative_purify(dae, x, config, differentiable=differentiable)
    return adaptive_purify(dae, x, mu, sigma, config, image_ids, differentiable=differentiable)
