"""Counter-based uniform noise in Triton, bit-identical to ``reference.uniform_noise_ref``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import (
    FLOAT_DTYPES,
    LAUNCH_OPTIONS,
    block_size,
    cast_to,
    check_device,
    image_noise_key,
    noise_key_base,
    uniform_from_key,
)


@triton.jit(do_not_specialize=["key_base", "step"])
def _uniform_noise_kernel(out_ptr, ids_ptr, key_base, step, numel, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    key = image_noise_key(ids_ptr, row, key_base, step)
    u = uniform_from_key(key, col)
    # int64 row offset: N * numel can pass 2**31 for large batches of large images.
    tl.store(
        out_ptr + row.to(tl.int64) * numel + col,
        cast_to(u, out_ptr.dtype.element_ty),
        mask=col < numel,
    )


def uniform_noise_triton(
    seed: int, image_ids: torch.Tensor, step: int, numel: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Uniform noise in [-1, 1) for each image: image_ids (N,) int -> (N, numel) ``dtype``.

    Bit-identical to ``uniform_noise_ref``; the value of element j of an image depends only on
    (seed, image id, step, j). Runs on ``image_ids.device``.

    Example:
        >>> u = uniform_noise_triton(0, torch.arange(4, device="cuda"), 1, 3 * 32 * 32)
    """
    if image_ids.dim() != 1:
        raise ValueError(f"image_ids must have shape (N,); got {tuple(image_ids.shape)}.")
    if image_ids.dtype.is_floating_point or image_ids.dtype.is_complex:
        raise ValueError(f"image_ids must be an integer tensor; got {image_ids.dtype}.")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16; got {dtype}.")
    numel = int(numel)
    if not 0 <= numel < 2**31:
        raise ValueError(f"numel must be in [0, 2**31); got {numel}.")
    check_device(_uniform_noise_kernel, [image_ids], ["image_ids"])
    ids = image_ids.to(torch.int64).contiguous()
    n = ids.shape[0]
    out = torch.empty((n, numel), dtype=dtype, device=ids.device)
    if n == 0 or numel == 0:
        return out
    block = block_size(numel)
    _uniform_noise_kernel[(n, triton.cdiv(numel, block))](
        out,
        ids,
        noise_key_base(seed),
        int(step) & 0xFFFFFFFF,
        numel,
        BLOCK=block,
        **LAUNCH_OPTIONS,
    )
    return out
