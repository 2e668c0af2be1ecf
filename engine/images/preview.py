"""Preview grids: input | purified | amplified difference, one row per image, with its notes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from apudae_engine.core.files import write_atomic
from apudae_engine.images.codec import encode_png

DIFF_GAIN = 8.0  # a few grey levels of change become visible
NOTE_WIDTH = 200  # pixels of text beside each row
_BACKGROUND, _TEXT, _FLAG = 64, (235, 235, 235), (255, 110, 90)

# One row: (input, purified) uint8 (C, H, W) arrays, optionally with its manifest record.
Row = tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, Mapping[str, Any] | None]


def note_lines(note: Mapping[str, Any]) -> list[str]:
    """The text beside a row, from its manifest record: file name, r before -> after, flagged,
    label before -> after (class names where the record has them). Missing fields are left out.
    """
    lines = [str(note["path"])] if "path" in note else []
    if "r_before" in note and "r_after" in note:
        lines.append(f"r {note['r_before']:.2f} -> {note['r_after']:.2f}")
    if "flagged" in note:
        lines.append("flagged" if note["flagged"] else "not flagged")
    before = note.get("class_before", note.get("label_before"))
    after = note.get("class_after", note.get("label_after"))
    if before is not None and after is not None:
        lines.append(f"label {before} -> {after}")
    return lines


def preview_grid(rows: Sequence[Row], min_side: int = 96, gap: int = 2) -> np.ndarray:
    """Rows of uint8 (C, H, W) (input, purified[, note]) -> one uint8 RGB (3, H', W') image.

    Small images are enlarged by an integer factor (nearest neighbour) so pixels stay visible.
    The difference column shows |purified - input| * DIFF_GAIN, clipped. Rows with a note (a
    manifest record, see :func:`note_lines`) get its lines written beside them in Pillow's
    default font; "flagged" stands out in red.
    """
    from PIL import Image, ImageDraw, ImageFont

    c, h, w = rows[0][0].shape
    k = max(1, -(-min_side // max(h, w)))
    tile_h, tile_w = h * k, w * k
    notes = [note_lines(r[2]) if len(r) > 2 and r[2] else [] for r in rows]
    font = ImageFont.load_default()
    line_h = _line_height(font)
    row_h = max(tile_h, max(len(n) for n in notes) * line_h)
    text_w = NOTE_WIDTH if any(notes) else 0
    cols = 3
    grid = np.full((3, len(rows) * (row_h + gap) + gap,
                    cols * (tile_w + gap) + gap + text_w), _BACKGROUND, np.uint8)
    for i, (x, p, *_) in enumerate(rows):
        diff = np.clip(np.abs(p.astype(np.int16) - x.astype(np.int16)) * DIFF_GAIN, 0, 255)
        for j, tile in enumerate((x, p, diff.astype(np.uint8))):
            t = np.repeat(np.repeat(tile, k, axis=1), k, axis=2)
            if t.shape[0] == 1:
                t = np.repeat(t, 3, axis=0)
            y0, x0 = gap + i * (row_h + gap), gap + j * (tile_w + gap)
            grid[:, y0:y0 + tile_h, x0:x0 + tile_w] = t
    if not text_w:
        return grid
    image = Image.fromarray(np.ascontiguousarray(grid.transpose(1, 2, 0)))
    draw = ImageDraw.Draw(image)
    x0 = cols * (tile_w + gap) + gap + 4
    for i, lines in enumerate(notes):
        for n, line in enumerate(lines):
            text = _fit(font, line, text_w - 8)
            draw.text((x0, gap + i * (row_h + gap) + n * line_h), text, font=font,
                      fill=_FLAG if line == "flagged" else _TEXT)
    return np.asarray(image).transpose(2, 0, 1).copy()


def _line_height(font) -> int:
    left, top, right, bottom = font.getbbox("Ag|")
    return bottom + 3


def _fit(font, text: str, width: int) -> str:
    """``text``, shortened from the left ("...tail") to fit ``width`` pixels: a file name's end
    says most about it."""
    if font.getlength(text) <= width:
        return text
    while len(text) > 1 and font.getlength("..." + text) > width:
        text = text[1:]
    return "..." + text


def write_preview(path: Path, rows: Sequence[Row]) -> None:
    """Write the preview grid of ``rows`` (see :func:`preview_grid`) as a PNG."""
    write_atomic(path, encode_png(preview_grid(rows)))
