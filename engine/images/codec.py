"""Image files in and out: discovery, decoding with mode conversion, atomic PNG writing.

Decoding policy (documented in the README):
- Channels follow the model: 1 -> luminance (ITU-R 601-2, Pillow's "L"), 3 -> RGB.
- Alpha (RGBA, LA, palette with transparency) is composited onto black, the background of the
  digit and clothing datasets the bundled models were trained on.
- 16-bit grayscale is scaled to 8 bits (value / 257, rounded), not clipped.
- CMYK and YCbCr go through Pillow's conversion to RGB.
- Size: images whose size differs from the model's input are resized to it (bicubic with
  antialiasing, Pillow's default for downscaling). The calibration statistics mu and sigma are
  sums over a fixed pixel count and were measured at the model's size, and the classifier needs
  that size anyway, so the engine keeps the statistics valid instead of rescaling them.
- Anything Pillow cannot open, truncated files, zero-byte files and images over
  ``max_pixels`` raise :class:`ImageError` naming the file and the reason. ``max_pixels`` is
  the only size limit: Pillow's own (``Image.MAX_IMAGE_PIXELS``) is raised to match while the
  engine decodes.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from apudae_engine.core.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
DEFAULT_MAX_PIXELS = 64_000_000  # far above any real photo; stops decompression bombs early


class ImageError(UserError):
    """One input image could not be used; the message names the file and the reason."""


def discover_images(root: Path, follow_symlinks: bool = False) -> Iterator[Path]:
    """Image files under ``root``, recursively, in a fixed order (a folder's files by name, then
    its sub-folders by name); hidden files and folders are skipped.

    Links to files are listed wherever they point (see :func:`outside_root`); links to folders
    are entered only with ``follow_symlinks`` (each real folder once, so loops end).
    """
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=follow_symlinks):
        if follow_symlinks:
            real = os.path.realpath(dirpath)
            if real in seen:
                dirnames[:] = []
                continue
            seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                yield Path(dirpath) / name


def outside_root(path: Path, root: Path) -> bool:
    """Whether ``path`` (under ``root``) resolves, through links, to a file outside ``root``."""
    real, top = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([real, top]) != top


def _to_mode(im, channels: int):
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im, dtype=np.float64)
        # A 32-bit container may hold 8-bit values; 16-bit data is scaled, not clipped.
        scale = 1.0 if im.mode == "I" and a.max(initial=0) <= 255 else 1.0 / 257.0
        im = Image.fromarray(np.clip(np.rint(a * scale), 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        scale = 255.0 if a.max(initial=0) <= 1.0 else 1.0
        im = Image.fromarray(np.clip(np.rint(a * scale), 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        im = Image.alpha_composite(black, rgba).convert("RGB")
    if channels == 1:
        return im.convert("L")
    return im.convert("RGB")


def load_image(path: Path, channels: int, size: tuple[int, int] | int | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode ``path`` into a uint8 array (channels, H, W), resized to ``size`` (H, W) if given."""
    return _decode(path, path, channels, size, max_pixels)


def decode_image(data: bytes, name: str | Path, channels: int,
                 size: tuple[int, int] | int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """:func:`load_image` for a file already in memory (e.g. read by Ray); errors name ``name``."""
    import io

    return _decode(io.BytesIO(data), name, channels, size, max_pixels, len(data))


def conform_image(im, channels: int, size: tuple[int, int] | int | None = None) -> np.ndarray:
    """A Pillow image -> uint8 (channels, H, W) by the conversion policy, resized to ``size``."""
    from PIL import Image

    im = _to_mode(im, channels)
    if size is not None:
        hw = (size, size) if isinstance(size, int) else tuple(size)
        if im.size != (hw[1], hw[0]):
            im = im.resize((hw[1], hw[0]), Image.Resampling.BICUBIC, reducing_gap=None)
    arr = np.asarray(im, dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr)


_pillow_lock = threading.Lock()
_pillow_active: list[int] = []  # max_pixels of the decodes in progress
_pillow_default: list = []  # Pillow's own limit while any is in progress, to restore


@contextmanager
def _pillow_pixel_limit(max_pixels: int) -> Iterator[None]:
    """Raise Pillow's decompression-bomb limit to ``max_pixels`` while decoding.

    Pillow refuses images over twice ``Image.MAX_IMAGE_PIXELS`` (about 179 M pixels) on its
    own; the engine checks ``max_pixels`` itself (with its own message), so Pillow's limit is
    lifted above it for as long as any decode that needs it runs, and restored afterwards.
    """
    from PIL import Image

    with _pillow_lock:
        if not _pillow_active:
            _pillow_default[:] = [Image.MAX_IMAGE_PIXELS]
        _pillow_active.append(max_pixels)
        default = _pillow_default[0]
        if default is not None:  # None: the user switched Pillow's check off
            Image.MAX_IMAGE_PIXELS = max(default, max(_pillow_active))
    try:
        yield
    finally:
        with _pillow_lock:
            _pillow_active.remove(max_pixels)
            if not _pillow_active:
                Image.MAX_IMAGE_PIXELS = _pillow_default[0]


def _decode(source, path: str | Path, channels: int, size: tuple[int, int] | int | None,
            max_pixels: int, nbytes: int | None = None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        if (os.path.getsize(source) if nbytes is None else nbytes) == 0:
            raise ImageError(f"{path}: empty file (0 bytes)")
        with warnings.catch_warnings(), _pillow_pixel_limit(max_pixels):
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageError(f"{path}: {w}x{h} pixels exceeds the limit of {max_pixels} "
                                     "(possible decompression bomb; raise --max-pixels to allow)")
                im.load()
                return conform_image(im, channels, size)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not a recognised image format") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{path}: refused as a decompression bomb ({exc})") from None
    except OSError as exc:
        reason = str(exc) or exc.__class__.__name__
        if "truncated" in reason or "broken data" in reason:
            reason = f"truncated or corrupt image data ({reason})"
        raise ImageError(f"{path}: cannot decode: {reason}") from None
    except (ValueError, SyntaxError, MemoryError) as exc:  # Pillow raises these for odd files
        raise ImageError(f"{path}: cannot decode: {exc}") from None


def encode_png(arr: np.ndarray) -> bytes:
    """uint8 (C, H, W) with C in {1, 3} -> PNG bytes (lossless)."""
    import io

    from PIL import Image

    img = Image.fromarray(arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def to_uint8(x) -> np.ndarray:
    """Float tensor/array in [0, 1] (C, H, W) -> uint8, rounding to nearest."""
    a = x.detach().cpu().float().numpy() if hasattr(x, "detach") else np.asarray(x, np.float32)
    return np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)
