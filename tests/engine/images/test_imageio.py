"""Decoding policy: mode conversions give the documented values; discovery is deterministic."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from apudae_engine.images.codec import ImageError, discover_images, load_image


def test_16_bit_is_scaled_not_clipped(tmp_path):
    Image.fromarray(np.full((4, 4), 65535 // 2, np.uint16)).save(tmp_path / "a.png")
    a = load_image(tmp_path / "a.png", 1)
    assert a.shape == (1, 4, 4) and a.dtype == np.uint8 and int(a[0, 0, 0]) == 127


def test_alpha_is_composited_on_black(tmp_path):
    Image.new("RGBA", (2, 2), (200, 100, 0, 128)).save(tmp_path / "a.png")
    a = load_image(tmp_path / "a.png", 3)
    assert a[:, 0, 0].tolist() == pytest.approx([100, 50, 0], abs=1)


def test_gray_to_rgb_and_resize(tmp_path):
    Image.new("L", (50, 40), 77).save(tmp_path / "a.bmp")
    a = load_image(tmp_path / "a.bmp", 3, (28, 28))
    assert a.shape == (3, 28, 28) and (a == 77).all()


def test_cmyk_webp_tiff(tmp_path):
    Image.new("CMYK", (5, 5), (0, 0, 0, 0)).save(tmp_path / "a.jpg")
    Image.new("RGB", (5, 5), (10, 20, 30)).save(tmp_path / "b.webp", lossless=True)
    Image.new("RGB", (5, 5), (10, 20, 30)).save(tmp_path / "c.tiff")
    assert load_image(tmp_path / "a.jpg", 3).min() > 240  # CMYK zero ink is white
    assert load_image(tmp_path / "b.webp", 3)[:, 0, 0].tolist() == [10, 20, 30]
    assert load_image(tmp_path / "c.tiff", 1).shape == (1, 5, 5)


def test_errors_name_the_file(tmp_path):
    p = tmp_path / "x.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(ImageError, match=str(p)):
        load_image(p, 1)


def test_discovery_is_recursive_sorted_and_skips_hidden(tmp_path):
    for rel in ("b/2.png", "a/1.JPG", "a/.hidden.png", ".git/x.png", "c.txt", "z.webp"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    found = [str(p.relative_to(tmp_path)) for p in discover_images(tmp_path)]
    assert found == ["z.webp", "a/1.JPG", "b/2.png"]


def test_max_pixels_above_pillows_own_limit_is_honoured(tmp_path, monkeypatch):
    """--max-pixels is the only limit: Pillow's MAX_IMAGE_PIXELS is raised to match while the
    engine decodes (here Pillow's limit is made small instead of the image huge)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses > 2000 pixels
    Image.new("L", (60, 60), 9).save(tmp_path / "a.png")  # 3600 pixels
    assert load_image(tmp_path / "a.png", 1, max_pixels=10_000).shape == (1, 60, 60)
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored afterwards
    with pytest.raises(ImageError, match="exceeds the limit of 3000"):
        load_image(tmp_path / "a.png", 1, max_pixels=3000)


def test_links_are_listed_and_outside_root_says_where_they_point(tmp_path):
    from apudae_engine.images.codec import outside_root

    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(b"x")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "b.png").write_bytes(b"x")
    (root / "in.png").symlink_to(root / "sub" / "a.png")
    (root / "out.png").symlink_to(tmp_path / "elsewhere" / "b.png")
    (root / "dirlink").symlink_to(tmp_path / "elsewhere")
    (root / "sub" / "up").symlink_to(root)  # a loop
    found = [str(p.relative_to(root)) for p in discover_images(root)]
    assert found == ["in.png", "out.png", "sub/a.png"]
    assert not outside_root(root / "in.png", root) and outside_root(root / "out.png", root)
    followed = [str(p.relative_to(root)) for p in discover_images(root, follow_symlinks=True)]
    assert followed == ["in.png", "out.png", "dirlink/b.png", "sub/a.png"]
