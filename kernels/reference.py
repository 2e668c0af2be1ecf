"""PyTorch references for the per-step work of adaptive purification.

These functions specify the per-step maths. ``adaptive_update_ref`` is the spec of the Triton
kernel ``adaptive_update.adaptive_update_triton`` and shares its signature; the compiled backend
compiles ``adaptive_update_keyed`` as is. They are written without in-place updates so that
autograd can differentiate through them: the reference purifier in ``apudae_engine`` uses them
directly, and attacks differentiate through it.

Noise is counter-based: the value for (seed, image id, step, element index) is a fixed integer
hash, so it does not depend on batch size, batch composition or device, and the Triton kernel
reproduces it bit for bit.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9
MIX_C1 = 0x7FEB352D
MIX_C2 = 0x846CA68B


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32), without int64 overflow."""
    lo = x & 0xFFFF
    hi = x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (lowbias32) on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, MIX_C1)
    x = x ^ (x >> 15)
    x = _mul32(x, MIX_C2)
    return x ^ (x >> 16)


def image_keys(seed: int | torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
    """The step-independent part of the noise keys: (N,) int64 in [0, 2**32). ``seed`` may
    be a 0-d int64 tensor (an input of the exported whole loop)."""
    ids = image_ids.to(torch.int64) & MASK32
    if isinstance(seed, torch.Tensor):
        k = mix32(((seed.to(torch.int64) & MASK32) ^ GOLDEN).expand_as(ids))
    else:
        k = mix32(torch.full_like(ids, (int(seed) & MASK32) ^ GOLDEN))
    return mix32(k ^ ids)


def step_keys(keys: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    """Per-image keys of one step from ``image_keys``; ``step`` may be an int64 tensor, so a
    compiled loop reuses one graph for every step."""
    return mix32((keys + step) & MASK32)


def noise_keys(seed: int | torch.Tensor, image_ids: torch.Tensor, step: int) -> torch.Tensor:
    """Per-image 32-bit keys for one step: shape (N,) int64 in [0, 2**32)."""
    return step_keys(image_keys(seed, image_ids), int(step))


def noise_from_keys(keys: torch.Tensor, numel: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform noise in [-1, 1) from one step's keys: (N,) -> (N, numel).

    Element j of image i is ``2 * (h >> 8) / 2**24 - 1`` with ``h = mix32(mix32(key_i ^ j))``;
    24 bits make the float32 value exact.
    """
    idx = torch.arange(numel, device=keys.device, dtype=torch.int64).unsqueeze(0)
    h = mix32(mix32(keys.unsqueeze(1) ^ idx))
    u = (h >> 8).to(torch.float32) * (1.0 / 16777216.0)
    return (2.0 * u - 1.0).to(dtype)


def uniform_noise_ref(
    seed: int, image_ids: torch.Tensor, step: int, numel: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Uniform noise in [-1, 1) for each image and step: shape (N, numel)."""
    return noise_from_keys(noise_keys(seed, image_ids, step), numel, dtype)


def squared_error_ref(y: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Per-image sum of squared differences: y, recon (N, ...) -> (N,), summed in float32
    (float64 inputs stay float64, so gradient checks keep their precision)."""
    d = (y - recon).to(torch.promote_types(y.dtype, torch.float32)).flatten(1)
    return (d * d).sum(dim=1)


def hinge_weight_ref(r: torch.Tensor, mu: float, sigma: float) -> torch.Tensor:
    """dL/dr for L = sum max(0, r - mu)^2 / sigma^2: (N,) -> (N,)."""
    return 2.0 * torch.clamp(r - mu, min=0.0) / (sigma * sigma)


def noise_amplitude_ref(
    r: torch.Tensor, mu: float, sigma: float, eps_n: float, max_scale: float
) -> torch.Tensor:
    """Per-image noise level eps_n * clip(((r - mu) / (2 sigma))^2, 0, max_scale): (N,)."""
    z = (r - mu) / (2.0 * sigma)
    return eps_n * torch.clamp(z * z, 0.0, max_scale)


def adam_scalars(step: int, lr: float, beta1: float, beta2: float) -> tuple[float, float]:
    """Adam's bias corrections at ``step`` (from 1): (lr / (1 - beta1**t), sqrt(1 - beta2**t))."""
    return lr / (1.0 - beta1**step), (1.0 - beta2**step) ** 0.5


def adam_update_ref(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step_size: float | torch.Tensor,
    bias2_sqrt: float | torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Adam update with the bias corrections given (``adam_scalars``); they may be 0-d
    tensors, so a compiled loop reuses one graph for every step. Inputs are not modified."""
    exp_avg = exp_avg * beta1 + grad * (1.0 - beta1)
    exp_avg_sq = exp_avg_sq * beta2 + grad * grad * (1.0 - beta2)
    # sqrt'(0) is infinite; where v == 0 the gradient is zero too, and autograd would give
    # 0 * inf = NaN to attacks differentiating through an inactive image's first step.
    positive = exp_avg_sq > 0
    root = torch.where(positive, exp_avg_sq, torch.ones_like(exp_avg_sq)).sqrt()
    denom = torch.where(positive, root, torch.zeros_like(root)) / bias2_sqrt + eps
    param = param - step_size * (exp_avg / denom)
    return param, exp_avg, exp_avg_sq


def adam_step_ref(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Adam update, numerically as ``torch.optim.Adam`` (step counts from 1).

    Returns new (param, exp_avg, exp_avg_sq); inputs are not modified.
    """
    step_size, bias2_sqrt = adam_scalars(step, lr, beta1, beta2)
    return adam_update_ref(param, grad, exp_avg, exp_avg_sq, step_size, bias2_sqrt, beta1,
                           beta2, eps)


def adaptive_update_keyed(
    x: torch.Tensor,
    delta: torch.Tensor,
    grad_r: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    r: torch.Tensor,
    keys: torch.Tensor,
    step_size: float | torch.Tensor,
    bias2_sqrt: float | torch.Tensor,
    mu: float,
    sigma: float,
    eps_n: float,
    max_scale: float,
    beta1: float,
    beta2: float,
    eps: float,
    noise: bool = True,
    hinge: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``adaptive_update_ref`` on (N, ...) tensors of any layout, with the step given by its
    noise ``keys`` (``step_keys``) and Adam scalars (``adam_scalars``): the form compiled and
    exported loops use, where the step is a tensor.

    ``hinge=False`` takes ``grad_r`` as the finished gradient (the reference loop's autograd
    step returns dL/dy, the hinge already applied; the iterative method has none)."""
    per_image = (x.shape[0],) + (1,) * (x.dim() - 1)
    if noise:
        amp = noise_amplitude_ref(r, mu, sigma, eps_n, max_scale).to(x.dtype)
        u = noise_from_keys(keys, x[0].numel(), x.dtype).view_as(x)
        x = x + amp.view(per_image) * u
    grad = hinge_weight_ref(r, mu, sigma).to(grad_r.dtype).view(per_image) * grad_r \
        if hinge else grad_r
    delta, exp_avg, exp_avg_sq = adam_update_ref(
        delta, grad, exp_avg, exp_avg_sq, step_size, bias2_sqrt, beta1, beta2, eps
    )
    return x, delta, exp_avg, exp_avg_sq


def adaptive_update_ref(
    x: torch.Tensor,
    delta: torch.Tensor,
    grad_r: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    r: torch.Tensor,
    image_ids: torch.Tensor,
    seed: int | torch.Tensor,
    step: int,
    mu: float,
    sigma: float,
    eps_n: float,
    max_scale: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    noise: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One whole adaptive step after the DAE pass, on flat (N, D) tensors.

    ``grad_r`` is dr/dy at y = x + delta and ``r`` the per-image error there. Adds the step's
    noise to x, takes the Adam step on delta with the hinge gradient, and returns
    (x, delta, exp_avg, exp_avg_sq). ``step`` counts from 1 and keys the noise as well.
    """
    step_size, bias2_sqrt = adam_scalars(step, lr, beta1, beta2)
    return adaptive_update_keyed(
        x, delta, grad_r, exp_avg, exp_avg_sq, r, noise_keys(seed, image_ids, step), step_size,
        bias2_sqrt, mu, sigma, eps_n, max_scale, beta1, beta2, eps, noise
    )
