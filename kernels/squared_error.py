"""Per-image reconstruction error in Triton, matching ``reference.squared_error_ref``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import (
    LAUNCH_OPTIONS,
    block_size,
    check_device,
    check_float_dtype,
    check_no_grad,
    round_through,
)

# Elements one program sums. Rows up to this size (CIFAR, MNIST) take one program per image and
# write their sum directly; longer rows (ImageNet) split so that small batches still fill the
# GPU, and a deterministic second pass adds the partial sums (no atomics, same result each run).
CHUNK = 16384


@triton.jit
def _squared_error_kernel(
    y_ptr, recon_ptr, partial_ptr, d, n_chunks, CHUNK: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    base = row.to(tl.int64) * d
    start = chunk * CHUNK
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for off in tl.range(0, CHUNK, BLOCK):
        col = start + off + tl.arange(0, BLOCK)
        mask = col < d
        y = tl.load(y_ptr + base + col, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(recon_ptr + base + col, mask=mask, other=0.0).to(tl.float32)
        # The reference subtracts in the input dtype and then upcasts; the float32 difference
        # of two fp16/bf16 values is exact, so rounding it once reproduces that subtraction.
        diff = round_through(y - r, y_ptr.dtype.element_ty)
        acc += diff * diff
    tl.store(partial_ptr + row * n_chunks + chunk, tl.sum(acc, axis=0))


def squared_error_triton(y: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Per-image sum of squared differences: y, recon (N, ...) -> (N,) float32.

    Accumulates in float32 for float16/bfloat16 inputs. Runs on the inputs' device.

    Example:
        >>> r = squared_error_triton(images, dae(images))  # (N, 3, 32, 32) -> (N,)
    """
    if y.shape != recon.shape:
        raise ValueError(
            f"y and recon must have the same shape; got {tuple(y.shape)} and {tuple(recon.shape)}."
        )
    if y.dim() < 1:
        raise ValueError("y must have a batch dimension: shape (N, ...).")
    check_float_dtype(y, "y")
    check_float_dtype(recon, "recon")
    check_device(_squared_error_kernel, [y, recon], ["y", "recon"])
    check_no_grad([y, recon], "squared_error_triton")
    if y.dtype != recon.dtype:  # the reference's `y - recon` promotes; do the same up front
        common = torch.promote_types(y.dtype, recon.dtype)
        y, recon = y.to(common), recon.to(common)
    n = y.shape[0]
    d = y[0].numel() if n else 0
    if n == 0 or d == 0:
        return torch.zeros(n, dtype=torch.float32, device=y.device)
    y, recon = y.contiguous(), recon.contiguous()
    block = block_size(d)
    chunk = max(block, CHUNK) if d > CHUNK else block * triton.cdiv(d, block)
    n_chunks = triton.cdiv(d, chunk)
    partial = torch.empty((n, n_chunks), dtype=torch.float32, device=y.device)
    _squared_error_kernel[(n, n_chunks)](
        y, recon, partial, d, n_chunks, CHUNK=chunk, BLOCK=block, **LAUNCH_OPTIONS
    )
    return partial[:, 0] if n_chunks == 1 else partial.sum(dim=1)
