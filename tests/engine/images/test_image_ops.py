"""The tensor versions of the decoding policy agree bit for bit with Pillow, their reference."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from apudae_engine.images.ops import resize_bicubic, rgb_to_luminance


def test_luminance_matches_pillow_for_every_rgb_colour():
    every = np.arange(1 << 24, dtype=np.uint32)
    rgb = np.stack([every >> 16, (every >> 8) & 255, every & 255], -1).astype(np.uint8)
    rgb = rgb.reshape(4096, 4096, 3)
    pillow = np.asarray(Image.fromarray(rgb).convert("L"))
    ours = rgb_to_luminance(torch.from_numpy(rgb).permute(2, 0, 1))[0].numpy()
    assert np.array_equal(ours, pillow)


def pillow_resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    pil = Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0))
    out = np.asarray(pil.resize(size[::-1], Image.Resampling.BICUBIC, reducing_gap=None))
    return out[None] if out.ndim == 2 else out.transpose(2, 0, 1)


@settings(max_examples=150, deadline=None)
@given(channels=st.sampled_from([1, 3]), h=st.integers(1, 90), w=st.integers(1, 90),
       out_h=st.integers(1, 70), out_w=st.integers(1, 70), edges=st.booleans(),
       seed=st.integers(0, 2**16))
def test_resize_matches_pillow_bicubic(channels, h, w, out_h, out_w, edges, seed):
    img = np.random.default_rng(seed).integers(0, 256, (channels, h, w), dtype=np.uint8)
    if edges:  # hard edges make the bicubic overshoot, so clipping is exercised too
        img = np.where(img > 127, 255, 0).astype(np.uint8)
    ours = resize_bicubic(torch.from_numpy(img)[None], (out_h, out_w))[0].numpy()
    assert np.array_equal(ours, pillow_resize(img, (out_h, out_w)))


def test_resize_of_large_photo_sizes_matches_pillow():
    rng = np.random.default_rng(0)
    for (h, w), size in [((480, 640), (224, 224)), ((1000, 333), (28, 28)),
                         ((31, 700), (32, 32)), ((17, 19), (224, 224))]:
        img = rng.integers(0, 256, (3, h, w), dtype=np.uint8)
        ours = resize_bicubic(torch.from_numpy(img)[None], size)[0].numpy()
        assert np.array_equal(ours, pillow_resize(img, size)), (h, w, size)
