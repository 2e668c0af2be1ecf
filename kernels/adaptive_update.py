"""The whole per-step update of adaptive purification as one Triton kernel.

After the DAE pass gives r and dr/dy, one launch and one pass over memory: per image, the noise
amplitude and hinge weight from r; per element, the counter-based noise added to x and the Adam
step on delta. Matches ``reference.adaptive_update_ref``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import triton
import triton.language as tl

from ._triton_utils import (
    LAUNCH_OPTIONS,
    Launch,
    block_size,
    cast_to,
    check_device,
    check_float_dtype,
    check_no_grad,
    check_step,
    image_noise_key,
    noise_key_base,
    prepare,
    uniform_from_key,
)


@triton.jit
def adam_math(
    p, g, m, v, beta1, one_minus_beta1, beta2, one_minus_beta2, bias2_sqrt, step_size, eps
):
    """The reference's Adam update on float32 values, operation for operation."""
    m = m * beta1 + g * one_minus_beta1
    v = v * beta2 + (g * g) * one_minus_beta2
    # Correctly rounded sqrt and division (Triton's defaults are approximate on CUDA).
    denom = tl.div_rn(tl.sqrt_rn(v), bias2_sqrt) + eps
    p = p - step_size * tl.div_rn(m, denom)
    return p, m, v


@triton.jit
def adam_update_store(
    g, offs, mask, p_ptr, m_ptr, v_ptr, p_out, m_out, v_out,
    beta1, one_minus_beta1, beta2, one_minus_beta2, bias2_sqrt, step_size, eps
):
    """Load the parameter and moments at ``offs``, take the Adam step with gradient ``g``
    (float32) and store all three in their outputs' dtypes."""
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)
    p, m, v = adam_math(
        p, g, m, v, beta1, one_minus_beta1, beta2, one_minus_beta2, bias2_sqrt, step_size, eps
    )
    tl.store(p_out + offs, cast_to(p, p_out.dtype.element_ty), mask=mask)
    tl.store(m_out + offs, cast_to(m, m_out.dtype.element_ty), mask=mask)
    tl.store(v_out + offs, cast_to(v, v_out.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["key_base", "step"])
def _adaptive_update_kernel(
    x_ptr,
    delta_ptr,
    grad_r_ptr,
    m_ptr,
    v_ptr,
    r_ptr,
    ids_ptr,
    x_out,
    delta_out,
    m_out,
    v_out,
    d,
    key_base,
    step,
    mu,
    two_sigma,
    sigma_sq,
    eps_n,
    max_scale,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    bias2_sqrt,
    step_size,
    eps,
    NOISE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = col < d
    offs = row.to(tl.int64) * d + col

    # Per-image scalars, recomputed by each program of the row: cheaper than a second launch.
    r = tl.load(r_ptr + row).to(tl.float32)
    excess = r - mu
    hinge = tl.div_rn(2.0 * tl.maximum(excess, 0.0), sigma_sq)

    if NOISE:
        z = tl.div_rn(excess, two_sigma)
        amp = eps_n * tl.minimum(tl.maximum(z * z, 0.0), max_scale)
        key = image_noise_key(ids_ptr, row, key_base, step)
        u = uniform_from_key(key, col)
        x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
        tl.store(x_out + offs, cast_to(x + amp * u, x_out.dtype.element_ty), mask=mask)

    g = hinge * tl.load(grad_r_ptr + offs, mask=mask).to(tl.float32)
    adam_update_store(
        g, offs, mask, delta_ptr, m_ptr, v_ptr, delta_out, m_out, v_out,
        beta1, one_minus_beta1, beta2, one_minus_beta2, bias2_sqrt, step_size, eps,
    )


def adam_scalars(step: int, lr: float, beta1: float, beta2: float, eps: float) -> dict:
    """Kernel scalars computed in double precision as the reference does, rounded once."""
    check_step(step)
    bias1 = 1.0 - beta1**step
    bias2 = 1.0 - beta2**step
    return {
        "beta1": float(beta1),
        "one_minus_beta1": 1.0 - beta1,
        "beta2": float(beta2),
        "one_minus_beta2": 1.0 - beta2,
        "bias2_sqrt": bias2**0.5,
        "step_size": lr / bias1,
        "eps": float(eps),
    }


def adaptive_update_triton(
    x: torch.Tensor,
    delta: torch.Tensor,
    grad_r: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    r: torch.Tensor,
    image_ids: torch.Tensor,
    seed: int,
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
    *,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One whole adaptive step after the DAE pass, in one kernel launch.

    x, delta, grad_r, exp_avg, exp_avg_sq: (N, D) (or (N, ...), flattened per image; the noise
    index is the flat element index); r (N,) the per-image error at y = x + delta and grad_r
    its gradient dr/dy there; image_ids (N,) integers keying the noise with (seed, step).
    Each tensor keeps its dtype; the math runs in float32. ``step`` counts from 1.

    Returns (x, delta, exp_avg, exp_avg_sq): new tensors, or with ``inplace=True`` the inputs
    written in place (they must then be contiguous). With ``noise=False`` x is returned as is.

    Example:
        >>> x, delta, m, v = adaptive_update_triton(x, delta, grad_r, m, v, r, ids, seed=0,
        ...     step=1, mu=2.856, sigma=0.923, eps_n=0.7 / 255, max_scale=4.0, lr=2 / 255,
        ...     beta1=0.9, beta2=0.999, eps=1e-8)
    """
    big = [x, delta, grad_r, exp_avg, exp_avg_sq]
    big_names = ["x", "delta", "grad_r", "exp_avg", "exp_avg_sq"]
    if x.dim() < 1:
        raise ValueError("x must have shape (N, D).")
    for t, name in zip(big, big_names, strict=True):
        if t.shape != x.shape:
            raise ValueError(
                f"{name} must have the shape of x {tuple(x.shape)}; got {tuple(t.shape)}."
            )
        check_float_dtype(t, name)
    n = x.shape[0]
    for t, name in ((r, "r"), (image_ids, "image_ids")):
        if t.shape != (n,):
            raise ValueError(f"{name} must have shape (N,) = ({n},); got {tuple(t.shape)}.")
    check_float_dtype(r, "r")
    if image_ids.dtype.is_floating_point or image_ids.dtype.is_complex:
        raise ValueError(f"image_ids must be an integer tensor; got {image_ids.dtype}.")
    if sigma <= 0:
        raise ValueError(f"sigma must be positive; got {sigma}.")
    check_device(_adaptive_update_kernel, [*big, r, image_ids], [*big_names, "r", "image_ids"])
    check_no_grad([*big, r], "adaptive_update_triton")
    scalars = adam_scalars(step, lr, beta1, beta2, eps)

    if noise:  # without noise x is neither read nor written
        x = prepare(x, "x", inplace)
    delta, exp_avg, exp_avg_sq = (
        prepare(t, name, inplace)
        for t, name in zip(
            [delta, exp_avg, exp_avg_sq], ["delta", "exp_avg", "exp_avg_sq"], strict=True
        )
    )
    grad_r, r = grad_r.contiguous(), r.contiguous()
    ids = image_ids.to(torch.int64).contiguous()
    if inplace:
        outs = (x, delta, exp_avg, exp_avg_sq)
    else:
        x_new = torch.empty_like(x) if noise else x
        outs = (
            x_new,
            torch.empty_like(delta),
            torch.empty_like(exp_avg),
            torch.empty_like(exp_avg_sq),
        )
    d = x[0].numel() if n else 0
    if n == 0 or d == 0:
        return outs
    tensors = (x, delta, grad_r, exp_avg, exp_avg_sq, r, ids, *outs)
    adaptive_update_launch(tensors, d, seed, step, mu, sigma, eps_n, max_scale, scalars, noise)()
    return outs


def adaptive_update_launch(
    tensors: Sequence,
    d: int,
    seed: int,
    step: int,
    mu: float,
    sigma: float,
    eps_n: float,
    max_scale: float,
    scalars: dict,
    noise: bool,
) -> Launch:
    """The launch ``adaptive_update_triton`` makes once its inputs are checked.

    tensors: x, delta, grad_r, exp_avg, exp_avg_sq, r, the int64 image ids and the four outputs
    (x, delta, exp_avg, exp_avg_sq), all contiguous; d the elements per image (> 0);
    ``scalars`` from ``adam_scalars``. One program per image and block of the row.
    """
    block = block_size(d)
    return Launch(
        _adaptive_update_kernel,
        (tensors[0].shape[0], triton.cdiv(d, block)),
        (
            *tensors,
            d,
            noise_key_base(seed),
            int(step) & 0xFFFFFFFF,
            float(mu),
            2.0 * sigma,
            sigma * sigma,
            float(eps_n),
            float(max_scale),
        ),
        {**scalars, "NOISE": bool(noise), "BLOCK": block, **LAUNCH_OPTIONS},
    )


def compile_variants() -> Iterator[tuple[str, Launch]]:
    """Launches covering every compilation ``adaptive_update_triton`` can ask for, on mock
    tensors: ``apudae_kernels.compile_check`` compiles them for GPUs that are not there.

    Yields (variant, launch). Variants are the tensors' dtype (float32 is what the engine's loop
    passes and comes first; float16 and bfloat16 are the API's, with r float32), noise on or
    off, and each block size; within one, the launches cover the ways Triton specialises the
    integer arguments: d == 1, d % 16 == 0 or not, and a key base (from the seed) that fits
    int32 or not. Pointers are taken 16-byte aligned, as fresh allocations are, and the step
    below 2**31 (the engine runs at most 200).
    """
    from triton.runtime.jit import MockTensor

    scalars = adam_scalars(1, 2 / 255, 0.9, 0.999, 1e-8)
    # Seeds whose key base is below 2**31 (an int32 argument) and above (int64).
    seeds = [next(s for s in range(64) if (noise_key_base(s) >= 2**31) == big) for big in (0, 1)]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        image = MockTensor(dtype)
        tensors = (*[image] * 5, MockTensor(torch.float32), MockTensor(torch.int64), *[image] * 4)
        for noise in (True, False):
            # Largest first (1024: every image of 23 x 23 pixels or more). Per block, a row that
            # fills it (d % 16 == 0), one that does not, and d = 1 (Triton's constant) if there.
            for block in sorted({block_size(1 << k) for k in range(31)}, reverse=True):
                variant = f"{str(dtype).removeprefix('torch.')} {'noise' if noise else 'no-noise'}"
                for d in [d for d in (block, block - 1, 1) if block_size(d) == block]:
                    for seed in seeds:
                        launch = adaptive_update_launch(
                            tensors, d, seed, 1, 2.856, 0.923, 0.7 / 255, 4.0, scalars, noise
                        )
                        yield f"{variant} BLOCK={block}", launch
