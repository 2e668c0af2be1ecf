"""Helpers of the Triton kernels: the noise hash, dtype rounding and launch checks.

Only the kernel modules import this file, so importing ``apudae_kernels`` never imports triton.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from . import reference

# Dtypes the kernels load and store; arithmetic is always float32 inside.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

MIX_C1 = tl.constexpr(reference.MIX_C1)
MIX_C2 = tl.constexpr(reference.MIX_C2)
MASK32 = reference.MASK32


# --------------------------------------------------------------------------------------------
# Device code
# --------------------------------------------------------------------------------------------


@triton.jit
def mix32(x):
    """lowbias32 on uint32 values: shifts are logical and products wrap mod 2**32."""
    x = x ^ (x >> 16)
    x = x * MIX_C1
    x = x ^ (x >> 15)
    x = x * MIX_C2
    return x ^ (x >> 16)


@triton.jit
def image_noise_key(ids_ptr, row, key_base, step):
    """The per-image key of ``reference.noise_keys`` for image ``row`` (a uint32 scalar).

    ``key_base`` is ``mix32((seed & MASK32) ^ reference.GOLDEN)``, computed once on the host.
    """
    image_id = tl.load(ids_ptr + row).to(tl.uint32)  # int64 -> uint32 keeps the low 32 bits
    k = mix32(key_base.to(tl.uint32) ^ image_id)
    return mix32(k + step.to(tl.uint32))  # uint32 addition wraps like `& MASK32`


@triton.jit
def uniform_from_key(key, col):
    """Uniform noise in [-1, 1) for element indices ``col`` of the image keyed by ``key``."""
    h = mix32(mix32(key ^ col.to(tl.uint32)))
    u = (h >> 8).to(tl.float32) * (1.0 / 16777216.0)
    # Exact in float32 (24-bit values), so FMA contraction cannot change a bit.
    return 2.0 * u - 1.0


@triton.jit
def cast_to(x, dtype: tl.constexpr):
    """float32 -> ``dtype`` with round-to-nearest-even, identical on CUDA and the interpreter.

    The interpreter truncates float32 -> bfloat16, so bfloat16 is rounded by hand on the bits.
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        bits = tl.where(x == x, bits, 0x7FC00000)  # keep NaN a NaN
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


# --------------------------------------------------------------------------------------------
# Host code
# --------------------------------------------------------------------------------------------


def mix32_int(x: int) -> int:
    """``reference.mix32`` on one Python int in [0, 2**32)."""
    x ^= x >> 16
    x = (x * reference.MIX_C1) & MASK32
    x ^= x >> 15
    x = (x * reference.MIX_C2) & MASK32
    return x ^ (x >> 16)


def noise_key_base(seed: int) -> int:
    """The seed-only part of the per-image key, the same for every image."""
    return mix32_int((int(seed) & MASK32) ^ reference.GOLDEN)


def is_interpreted(kernel: object) -> bool:
    """Whether ``kernel`` runs under TRITON_INTERPRET (so it takes CPU tensors)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - layout of older triton releases
        return False
    return isinstance(kernel, InterpretedFunction)


def check_device(kernel: object, tensors: Sequence[torch.Tensor], names: Sequence[str]) -> None:
    """Raise ValueError unless all tensors share one device that ``kernel`` can run on."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        listing = ", ".join(f"{n} on {t.device}" for n, t in zip(names, tensors, strict=True))
        raise ValueError(f"All tensors must be on one device; got {listing}.")
    device = devices.pop()
    if device.type == "cuda":
        return
    if device.type == "cpu" and is_interpreted(kernel):
        return
    raise ValueError(
        f"Triton kernels need CUDA tensors; got tensors on {device}. Move them to a CUDA "
        "device, or set TRITON_INTERPRET=1 before triton is imported to run on the CPU."
    )


def check_no_grad(tensors: Sequence[torch.Tensor], op: str) -> None:
    """Triton kernels have no backward: refuse inputs that expect one instead of dropping it."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise ValueError(
            f"{op} has no backward pass; use the reference in apudae_kernels.reference to "
            "differentiate, or call it under torch.no_grad()."
        )


def check_float_dtype(t: torch.Tensor, name: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16; got {t.dtype}.")


def check_step(step: int) -> None:
    if int(step) < 1:
        raise ValueError(f"step counts from 1 (Adam's bias correction divides by 0); got {step}.")


def prepare(t: torch.Tensor, name: str, inplace: bool) -> torch.Tensor:
    """A contiguous view of ``t``; with ``inplace`` the kernel writes into ``t`` itself."""
    if t.is_contiguous():
        return t
    if inplace:
        raise ValueError(f"inplace=True needs a contiguous {name}; call .contiguous() first.")
    return t.contiguous()


def block_size(d: int, max_block: int = 1024) -> int:
    """A power-of-two block no larger than the row needs (small rows waste no lanes)."""
    return max(16, min(max_block, triton.next_power_of_2(max(d, 1))))


@dataclass(frozen=True)
class Launch:
    """One kernel launch, ``kernel[grid](*args, **kwargs)``. Launchers build one and call it, so
    that ``apudae_kernels.compile_check`` compiles exactly what they launch."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.kwargs)


# Launch options for every kernel: no FMA contraction, so float32 results round like eager
# PyTorch (separate multiply and add), which keeps the comparison with the reference tight.
LAUNCH_OPTIONS = {"enable_fp_fusion": False}
