"""What the GPU-capable loaders (``dali``, ``nvjpeg``) share: route by header, decode in chunks,
finish on the device.

The fast decoders only see files they decode exactly as Pillow would: 8-bit L or RGB baseline
PNG and JPEG, without transparency, under ``max_pixels``, structurally complete (PNG ends with
IEND, JPEG with EOI). A header read, not a decode, decides this. Everything else (palette,
alpha, 16-bit, CMYK, BMP/TIFF/WebP, damaged or oversized files) goes to Pillow, which applies
the policy and raises the same :class:`ImageError` as the ``cpu`` loader. If a fast decoder still
fails on a chunk (corrupt data behind a valid header stops a whole DALI pipeline), that chunk
is decoded with Pillow instead, so one bad file never costs the others and is reported exactly
as the ``cpu`` loader reports it. Decoded RGB is finished on the device by
:mod:`apudae_engine.images.ops`, bit-exact with Pillow's luminance and bicubic resize, so for
PNG every loader yields identical tensors. JPEG decoders differ slightly (see
``benchmarks/results/loaders_jpeg_diff.md``).

A subclass sets ``name`` and ``formats`` and implements ``_decode`` (and
``unavailable_reason``); see :mod:`apudae_engine.images.dali_loader`.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import torch

from apudae_engine.images.codec import ImageError
from apudae_engine.images.loaders import BatchData, Loader
from apudae_engine.images.ops import resize_bicubic, rgb_to_luminance

log = logging.getLogger(__name__)
CHUNK = 64  # files per fast-decoder call: bounds full-resolution decode memory
_FINISH_ELEMENTS = 1 << 25  # source values per resize step: 256 MiB as float64
_RETRIES = 4  # failed files taken out of a chunk before the rest of it goes to Pillow


class DecodeFailed(Exception):
    """A fast decoder failed on a chunk; ``sample`` is the failing position when known."""

    def __init__(self, reason: str, sample: int | None = None) -> None:
        super().__init__(reason)
        self.sample = sample


class FastLoader(Loader):
    """Route by header, fast-decode in chunks of ``CHUNK`` files, finish; see the module
    docstring."""

    formats: tuple[str, ...] = ("JPEG", "PNG")

    def load_batch(self, paths, shape, max_pixels) -> BatchData:
        c, h, w = shape
        result: dict[int, torch.Tensor | np.ndarray | ImageError] = {}
        slow: list[int] = []

        def probe(i: int) -> np.ndarray | None:
            return _probe(paths[i], max_pixels, self.formats)

        # A window of files at a time: encoded bytes and full-size decodes stay bounded.
        for start in range(0, len(paths), CHUNK):
            window = range(start, min(start + CHUNK, len(paths)))
            encoded = dict(zip(window, self._pool.map(probe, window)))
            chunk = [i for i in window if encoded[i] is not None]
            slow += [i for i in window if encoded[i] is None]
            for attempt in range(_RETRIES + 1):
                if not chunk:
                    break
                try:
                    rgb = self._decode([encoded[i] for i in chunk])
                except DecodeFailed as exc:
                    if exc.sample is None or attempt == _RETRIES:
                        log.warning("%s loader failed on %d files (%s); decoding them with "
                                    "Pillow", self.name, len(chunk), exc)
                        slow += chunk
                        break
                    slow.append(chunk.pop(exc.sample))  # Pillow reports it; retry the rest
                    continue
                result.update(zip(chunk, _finish(rgb, c, (h, w))))
                break
        result.update(self._pillow(paths, sorted(slow), shape, max_pixels))
        ok = [i for i in range(len(paths)) if not isinstance(result[i], ImageError)]
        errors = {i: r for i, r in result.items() if isinstance(r, ImageError)}
        if not ok:
            return BatchData(torch.empty((0, c, h, w), device=self.device), [], errors)
        decoded_by_pillow = [i for i in ok if isinstance(result[i], np.ndarray)]
        if decoded_by_pillow:  # one host-to-device copy for all of them
            moved = torch.from_numpy(np.stack([result[i] for i in decoded_by_pillow]))
            result.update(zip(decoded_by_pillow, moved.to(self.device)))
        u8 = torch.stack([result[i] for i in ok])
        return BatchData(u8.float().div_(255.0), ok, errors)

    def _decode(self, encoded: list[np.ndarray]) -> list[torch.Tensor] | torch.Tensor:
        """Encoded files -> uint8 RGB on the device: (3, H_i, W_i) tensors, or one (n, 3, H, W)
        tensor when all have one size; raises DecodeFailed."""
        raise NotImplementedError


def _probe(path: Path, max_pixels: int, formats: tuple[str, ...]) -> np.ndarray | None:
    """The file's bytes when a fast decoder decodes it exactly as Pillow would, else None."""
    from PIL import Image

    try:
        data = Path(path).read_bytes()
        if not data:
            return None
        with Image.open(io.BytesIO(data)) as im:
            fmt, tile = im.format, im.tile
            if (fmt not in formats or im.mode not in ("L", "RGB") or len(tile) != 1
                    or "transparency" in im.info or im.width * im.height > max_pixels):
                return None
            rawmode = tile[0].args[0] if isinstance(tile[0].args, tuple) else tile[0].args
        if rawmode not in ("L", "RGB"):  # e.g. 16-bit or 1/2/4-bit PNG, CMYK JPEG
            return None
        array = np.frombuffer(data, np.uint8)
        complete = data[-8:-4] == b"IEND" if fmt == "PNG" else _jpeg_markers_ok(array)
        return array if complete else None
    except Exception:  # Pillow reports it, with the cpu loader's message
        return None


# Segments libjpeg reads for 8-bit Huffman JPEGs: SOF0-2, DHT, SOS, DQT, DRI, APPn, COM.
_JPEG_SEGMENTS = frozenset([0xC0, 0xC1, 0xC2, 0xC4, 0xDA, 0xDB, 0xDD, *range(0xE0, 0xF0), 0xFE])


def _jpeg_markers_ok(data: np.ndarray) -> bool:
    """Whether a JPEG's marker structure is sound: known segments with sane lengths, scans
    ended by a marker, EOI as the last two bytes. Pillow fails on unknown markers that other
    libjpeg-based decoders skip, so such files must go to Pillow to be reported the same way.
    Walks segment headers and searches scan data with numpy; no pixel is decoded."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8 or data[-2] != 0xFF or data[-1] != 0xD9:
        return False
    ff = np.flatnonzero(data[:-1] == 0xFF)
    after = data[ff + 1]
    # Inside scan data 0xFF is followed by 0x00 (stuffing) or a restart marker; anything else
    # ends the scan.
    scan_end = ff[(after != 0) & ((after < 0xD0) | (after > 0xD7))]
    pos = 2
    while pos < n - 1:
        if data[pos] != 0xFF:
            return False
        while pos < n - 1 and data[pos] == 0xFF:  # fill bytes
            pos += 1
        marker, pos = int(data[pos]), pos + 1
        if marker == 0xD9:
            return pos == n
        if marker not in _JPEG_SEGMENTS or pos + 2 > n:
            return False
        length = (int(data[pos]) << 8) | int(data[pos + 1])
        if length < 2:
            return False
        pos += length
        if marker == 0xDA:
            k = int(np.searchsorted(scan_end, pos))
            if k == len(scan_end):
                return False
            pos = int(scan_end[k])
    return False


def _finish(rgb: list[torch.Tensor] | torch.Tensor, channels: int,
            size: tuple[int, int]) -> list[torch.Tensor]:
    """uint8 RGB, (3, H_i, W_i) tensors or one (n, 3, H, W) -> uint8 (C, H, W) each, by the
    policy (Pillow-exact)."""
    out: list[torch.Tensor | None] = [None] * len(rgb)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, t in enumerate(rgb):
        groups.setdefault(tuple(t.shape), []).append(i)
    for shape, idx in groups.items():  # batched conversions per source size
        # The exact resize works in float64: keep each step near _FINISH_ELEMENTS values.
        step = max(1, _FINISH_ELEMENTS // (shape[0] * shape[1] * shape[2]))
        for k in range(0, len(idx), step):
            part = idx[k:k + step]
            whole = torch.is_tensor(rgb) and len(part) == len(rgb)
            x = rgb if whole else torch.stack([rgb[i] for i in part])
            if channels == 1:
                x = rgb_to_luminance(x)
            if tuple(shape[1:]) != tuple(size):
                x = resize_bicubic(x, size)
            for j, i in enumerate(part):
                out[i] = x[j]
    return out
