"""The decoding policy's conversions as tensor ops, bit-exact with Pillow, on any device.

GPU loaders decode to 8-bit RGB on the device and finish there, so they cannot call Pillow.
These functions reproduce exactly what :func:`apudae_engine.images.codec.load_image` does after
decoding an 8-bit L or RGB image, so that every loader yields the same uint8 values for the
same lossless input:

- :func:`rgb_to_luminance`: Pillow's ``convert("L")`` (ITU-R 601-2 in 16-bit fixed point).
- :func:`resize_bicubic`: Pillow's ``resize(..., BICUBIC, reducing_gap=None)``: separable,
  horizontal pass then vertical pass, antialiased when shrinking, coefficients rounded to 22-bit
  fixed point and the intermediate image clipped to 8 bits, as in Pillow's ``Resample.c``
  (including its choice of which pass runs first).
  The integer sums are evaluated as float64 matrix products; every term and partial sum is an
  integer below 2**53, so the result is exact whatever the summation order.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

_PRECISION_BITS = 22  # Pillow: 32 - 8 - 2


def rgb_to_luminance(rgb: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) RGB -> uint8 (..., 1, H, W) luminance, exactly Pillow's ``L``."""
    r, g, b = (rgb[..., i:i + 1, :, :].to(torch.int32) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8)


def _bicubic(x: np.ndarray) -> np.ndarray:
    # Pillow's bicubic_filter with a = -0.5, the same operations in the same order.
    x = np.abs(x)
    near = ((-0.5 + 2.0) * x - (-0.5 + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * -0.5
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=64)
def _coefficients(in_size: int, out_size: int) -> np.ndarray:
    """Fixed-point weights (out_size, in_size) as Pillow's precompute/normalize_coeffs_8bpc."""
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    ksize = int(np.ceil(support)) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64) - xmin
    taps = np.arange(ksize)
    w = _bicubic(((taps[None, :] + xmin[:, None]) - center[:, None] + 0.5) * (1.0 / filterscale))
    w = np.where(taps[None, :] < xmax[:, None], w, 0.0)
    total = np.zeros(out_size)
    for k in range(ksize):  # sequential sum, as in C (numpy's pairwise sum rounds differently)
        total = total + w[:, k]
    w = np.where(total[:, None] != 0.0, w / np.where(total == 0.0, 1.0, total)[:, None], w)
    fixed = np.where(w < 0, np.trunc(-0.5 + w * (1 << _PRECISION_BITS)),
                     np.trunc(0.5 + w * (1 << _PRECISION_BITS)))
    dense = np.zeros((out_size, in_size))
    cols = xmin[:, None] + taps[None, :]
    valid = taps[None, :] < xmax[:, None]
    rows = np.broadcast_to(np.arange(out_size)[:, None], cols.shape)
    dense[rows[valid], cols[valid]] = fixed[valid]
    return dense


def _pass(x: torch.Tensor, weights: np.ndarray) -> torch.Tensor:
    """One 8-bit pass along the last axis: clip8((1 << 21) + sum(v * k)) (float64, exact)."""
    k = torch.from_numpy(weights).to(x.device).T
    acc = x.to(torch.float64) @ k + float(1 << (_PRECISION_BITS - 1))
    return torch.floor(acc / (1 << _PRECISION_BITS)).clamp_(0, 255)


@functools.cache
def _pillow_vertical_first() -> bool:
    """Whether the installed Pillow runs the vertical pass first when the height shrinks more
    than twice as much as the width (Pillow 13, python-pillow/Pillow#9549; earlier releases
    always start horizontally). The 8-bit intermediate makes the order visible in the output,
    so it is probed once on a 5x4 image where the two orders differ."""
    from PIL import Image

    i, j = np.mgrid[0:5, 0:4]
    probe = ((i * 73 + j * 151) % 256).astype(np.uint8)
    pillow = np.asarray(Image.fromarray(probe).resize((3, 2), Image.Resampling.BICUBIC,
                                                      reducing_gap=None))
    x = torch.from_numpy(probe)[None, None]
    horizontal_first = _pass(_pass(x, _coefficients(4, 3)).transpose(-1, -2),
                             _coefficients(5, 2)).transpose(-1, -2)
    return not np.array_equal(horizontal_first[0, 0].to(torch.uint8).numpy(), pillow)


def resize_bicubic(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, C, size[0], size[1]), bit-exact with Pillow's bicubic.

    Example::

        small = resize_bicubic(torch.randint(0, 256, (2, 3, 100, 80), dtype=torch.uint8),
                               (28, 28))
    """
    h, w = images.shape[-2:]
    out_h, out_w = size
    x = images

    def horizontal(x: torch.Tensor) -> torch.Tensor:
        return _pass(x, _coefficients(w, out_w)) if out_w != w else x

    def vertical(x: torch.Tensor) -> torch.Tensor:
        if out_h == h:
            return x
        return _pass(x.transpose(-1, -2), _coefficients(h, out_h)).transpose(-1, -2)

    if _pillow_vertical_first() and h - out_h > 0 and h - out_h > (w - out_w) * 2:
        x = horizontal(vertical(x))
    else:
        x = vertical(horizontal(x))
    return x.to(torch.uint8).contiguous()
