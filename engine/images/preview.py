"""Preview grids: input | purified | amplified difference, one row per image."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from apudae_engine.core.files import write_atomic
from apudae_engine.images.codec import encode_png

DIFF_GAIN = 8.0  # a few grey levels of change become visible


def preview_grid(pairs: list[tuple[np.ndarray, np.ndarray]], min_side: int = 96,
                 gap: int = 2) -> np.ndarray:
    """uint8 (C, H, W) (input, purified) pairs -> one uint8 RGB (3, H', W') grid image.

    Small images are enlarged by an integer factor (nearest neighbour) so pixels stay visible.
    The difference column shows |purified - input| * DIFF_GAIN, clipped.
    """
    c, h, w = pairs[0][0].shape
    k = max(1, -(-min_side // max(h, w)))
    tile_h, tile_w = h * k, w * k
    rows, cols = len(pairs), 3
    grid = np.full((3, rows * (tile_h + gap) + gap, cols * (tile_w + gap) + gap), 64, np.uint8)
    for i, (x, p) in enumerate(pairs):
        diff = np.clip(np.abs(p.astype(np.int16) - x.astype(np.int16)) * DIFF_GAIN, 0, 255)
        for j, tile in enumerate((x, p, diff.astype(np.uint8))):
            t = np.repeat(np.repeat(tile, k, axis=1), k, axis=2)
            if t.shape[0] == 1:
                t = np.repeat(t, 3, axis=0)
            y0, x0 = gap + i * (tile_h + gap), gap + j * (tile_w + gap)
            grid[:, y0:y0 + tile_h, x0:x0 + tile_w] = t
    return grid


def write_preview(path: Path, pairs: list[tuple[np.ndarray, np.ndarray]]) -> None:
    write_atomic(path, encode_png(preview_grid(pairs)))
