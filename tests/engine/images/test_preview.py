"""preview.png: each row is annotated with its file name, r, flag and labels."""

from __future__ import annotations

import numpy as np
from PIL import Image

from apudae_engine.images.preview import NOTE_WIDTH, note_lines, preview_grid, write_preview


def _pair(seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (1, 28, 28), dtype=np.uint8)
    return x, np.clip(x.astype(np.int16) + 20, 0, 255).astype(np.uint8)


RECORD = {"path": "clean/coat_3.png", "status": "ok", "r_before": 41.2345, "r_after": 20.5,
          "flagged": True, "label_before": 4, "label_after": 6, "class_before": "Coat",
          "class_after": "Shirt"}


def test_note_lines_name_r_flag_and_labels():
    assert note_lines(RECORD) == ["clean/coat_3.png", "r 41.23 -> 20.50", "flagged",
                                  "label Coat -> Shirt"]
    plain = {"path": "a.png", "r_before": 1.0, "r_after": 0.5, "flagged": False,
             "label_before": 3, "label_after": 3}  # a classifier without class names
    assert note_lines(plain) == ["a.png", "r 1.00 -> 0.50", "not flagged", "label 3 -> 3"]
    assert note_lines({"path": "b.png", "r_before": 1.0, "r_after": 0.5, "flagged": False}) == [
        "b.png", "r 1.00 -> 0.50", "not flagged"]  # --classifier none


def test_annotated_rows_carry_text_beside_the_tiles(tmp_path):
    rows = [(*_pair(0), RECORD), (*_pair(1), {**RECORD, "flagged": False, "path": "x" * 300})]
    plain = preview_grid([r[:2] for r in rows])
    grid = preview_grid(rows)
    assert grid.shape[0] == 3 and grid.shape[2] == plain.shape[2] + NOTE_WIDTH
    assert np.array_equal(grid[:, :plain.shape[1], :plain.shape[2]], plain)  # tiles unchanged
    text = grid[:, :, plain.shape[2]:]
    row_h = grid.shape[1] // 2
    for i in range(2):
        assert (text[:, i * row_h:(i + 1) * row_h] != 64).any(), f"row {i} has no text"
    # "flagged" is drawn in red; the unflagged row has no red text.
    red = (text[0].astype(int) - text[2]) > 100
    assert red[:row_h].any() and not red[row_h:].any()
    write_preview(tmp_path / "p.png", rows)
    with Image.open(tmp_path / "p.png") as im:
        assert im.size == (grid.shape[2], grid.shape[1])
