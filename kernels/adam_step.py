"""One element-wise Adam update in Triton, matching ``reference.adam_step_ref``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import (
    LAUNCH_OPTIONS,
    block_size,
    cast_to,
    check_device,
    check_float_dtype,
    check_no_grad,
    check_step,
    prepare,
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


@triton.jit
def _adam_step_kernel(
    param_ptr,
    grad_ptr,
    m_ptr,
    v_ptr,
    param_out,
    m_out,
    v_out,
    numel,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    bias2_sqrt,
    step_size,
    eps,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(grad_ptr + offs, mask=mask).to(tl.float32)
    adam_update_store(
        g, offs, mask, param_ptr, m_ptr, v_ptr, param_out, m_out, v_out,
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


def adam_step_triton(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    *,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Adam update, numerically as ``torch.optim.Adam`` (step counts from 1).

    All four tensors have one shape (any); each keeps its dtype, and the math runs in float32.
    Returns new (param, exp_avg, exp_avg_sq), or with ``inplace=True`` writes into and returns
    the inputs (which must then be contiguous).

    Example:
        >>> p, m, v = adam_step_triton(p, g, m, v, step=1, lr=2 / 255, beta1=0.9,
        ...                            beta2=0.999, eps=1e-8)
    """
    tensors = [param, grad, exp_avg, exp_avg_sq]
    names = ["param", "grad", "exp_avg", "exp_avg_sq"]
    for t, name in zip(tensors, names, strict=True):
        if t.shape != param.shape:
            raise ValueError(
                f"{name} must have the shape of param {tuple(param.shape)}; got {tuple(t.shape)}."
            )
        check_float_dtype(t, name)
    check_device(_adam_step_kernel, tensors, names)
    check_no_grad(tensors, "adam_step_triton")
    scalars = adam_scalars(step, lr, beta1, beta2, eps)
    param, exp_avg, exp_avg_sq = (
        prepare(t, name, inplace)
        for t, name in zip(
            [param, exp_avg, exp_avg_sq], ["param", "exp_avg", "exp_avg_sq"], strict=True
        )
    )
    grad = grad.contiguous()
    if inplace:
        outs = (param, exp_avg, exp_avg_sq)
    else:
        outs = (torch.empty_like(param), torch.empty_like(exp_avg), torch.empty_like(exp_avg_sq))
    numel = param.numel()
    if numel == 0:
        return outs
    block = block_size(numel)
    _adam_step_kernel[(triton.cdiv(numel, block),)](
        param, grad, exp_avg, exp_avg_sq, *outs, numel, **scalars, BLOCK=block, **LAUNCH_OPTIONS
    )
    return outs
