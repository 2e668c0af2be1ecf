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

from dataclasses import dataclass

import torch
from torch import nn

from apudae_engine.method.config import PurifyConfig
from apudae_kernels.reference import (
    MASK32,
    adam_step_ref,
    mix32,
    noise_amplitude_ref,
    squared_error_ref,
    uniform_noise_ref,
)


@dataclass
class PurifyResult:
    """Purified images (N, C, H, W) and per-image statistics of the run.

    ``error_before`` is r(x) of the input; ``active_steps`` counts the steps at which the
    hinge was active (r > mu), i.e. steps that moved the image by gradient (direct and
    iterative methods count every step).
    """

    images: torch.Tensor
    error_before: torch.Tensor
    active_steps: torch.Tensor


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


def _input_gradient(loss: torch.Tensor, y: torch.Tensor, differentiable: bool) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, y, create_graph=differentiable)
    return g


def iterative_purify(
    dae: nn.Module, x: torch.Tensor, config: PurifyConfig, differentiable: bool = False
) -> PurifyResult:
    """Variant B: ``steps`` Adam steps on delta lowering sum_batch r(x + delta)."""
    delta = torch.zeros_like(x)
    m, v = torch.zeros_like(x), torch.zeros_like(x)
    error_before = None
    for t in range(1, config.steps + 1):
        with torch.enable_grad():
            y = x + delta
            if not differentiable:
                y = y.detach().requires_grad_(True)
            r = squared_error_ref(y, dae(y))
            g = _input_gradient(r.sum(), y, differentiable)
        if error_before is None:
            error_before = r.detach()
        delta, m, v = adam_step_ref(delta, g, m, v, t, config.lr, config.beta1, config.beta2,
                                    config.adam_eps)
        if not differentiable:
            delta, m, v = delta.detach(), m.detach(), v.detach()
    out = x + delta
    steps = torch.full_like(error_before, config.steps, dtype=torch.int64)
    return PurifyResult(out.clamp(0, 1) if config.clip else out, error_before, steps)


def adaptive_purify(
    dae: nn.Module,
    x: torch.Tensor,
    mu: float,
    sigma: float,
    config: PurifyConfig,
    image_ids: torch.Tensor | None = None,
    differentiable: bool = False,
) -> PurifyResult:
    """Variant C, APuDAE. For t = 1..T, with X = x and delta = 0 at the start:

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
    if config.sigma_override is not None:
        sigma = config.sigma_override
    n = x.shape[0]
    if image_ids is None:
        image_ids = image_fingerprint(x)
    image_ids = image_ids.to(device=x.device, dtype=torch.int64)
    if image_ids.shape != (n,):
        raise ValueError(f"image_ids must have shape ({n},), got {tuple(image_ids.shape)}")
    numel = x[0].numel()
    big_x, delta = x, torch.zeros_like(x)
    m, v = torch.zeros_like(x), torch.zeros_like(x)
    error_before = None
    active = torch.zeros(n, dtype=torch.int64, device=x.device)
    for t in range(1, config.steps + 1):
        with torch.enable_grad():
            y = big_x + delta
            if not differentiable:
                y = y.detach().requires_grad_(True)
            r = squared_error_ref(y, dae(y))
            loss = (torch.clamp(r - mu, min=0.0) ** 2).sum() / (sigma * sigma)
            g = _input_gradient(loss, y, differentiable)
        r_now = r.detach()
        if error_before is None:
            error_before = r_now
        active += (r_now > mu).to(torch.int64)
        if config.noise:
            amp = noise_amplitude_ref(r_now, mu, sigma, config.noise_eps, config.noise_max_scale)
            u = uniform_noise_ref(config.seed, image_ids, t, numel, x.dtype).view_as(x)
            big_x = big_x + amp.to(x.dtype).view(n, 1, 1, 1) * u
        delta, m, v = adam_step_ref(delta, g, m, v, t, config.lr, config.beta1, config.beta2,
                                    config.adam_eps)
        if not differentiable:
            big_x, delta, m, v = big_x.detach(), delta.detach(), m.detach(), v.detach()
    out = big_x + delta
    return PurifyResult(out.clamp(0, 1) if config.clip else out, error_before, active)


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
    if mu is None or sigma is None:
        raise ValueError("adaptive purification needs calibration statistics mu and sigma; "
                         "run `apudae-engine calibrate` on the DAE checkpoint")
    return adaptive_purify(dae, x, mu, sigma, config, image_ids, differentiable=differentiable)
