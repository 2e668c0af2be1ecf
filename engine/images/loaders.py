"""Image loaders: a batch of files in, a float tensor on the target device out.

One interface, three implementations, chosen like the compute backends::

    loader = get_loader("auto", torch.device("cuda"), workers=4)
    batch = loader.load_batch(paths, (3, 224, 224), max_pixels=64_000_000)
    batch.images     # float32 (len(batch.ok), 3, 224, 224) in [0, 1], on the device
    batch.ok         # indices into ``paths`` that decoded, ascending
    batch.errors     # {index: ImageError} for the others

- ``cpu``: Pillow in a thread pool (:func:`apudae_engine.images.codec.load_image`); the conversion
  policy of the README is defined by this path. The default without a GPU.
- ``dali``: NVIDIA DALI's ``fn.decoders.image`` fed through ``fn.external_source`` with our own
  file list, so every output maps back to its file. ``device="mixed"`` on a GPU (the result stays
  on the GPU), ``"cpu"`` with ``device_id=None`` otherwise. Extra: ``apudae-engine[dali]``.
- ``nvjpeg``: torchvision's ``decode_jpeg(device="cuda")`` for GPU machines without DALI.

``auto`` never takes ``dali`` on the CPU. There, Pillow threads decode as fast, and the exact
resize (dense float64 matrix products) is slower than Pillow's when shrinking large images.

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
"""

from __future__ import annotations

import io
import logging
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from apudae_engine.core.errors import BackendUnavailable, UserError
from apudae_engine.images.codec import ImageError, load_image
from apudae_engine.images.ops import resize_bicubic, rgb_to_luminance

log = logging.getLogger(__name__)
LOADERS = ("cpu", "dali", "nvjpeg")
_CHUNK = 64  # files per fast-decoder call: bounds full-resolution decode memory
_FINISH_ELEMENTS = 1 << 25  # source values per resize step: 256 MiB as float64
_RETRIES = 4  # failed files taken out of a chunk before the rest of it goes to Pillow
_logged: set[tuple[str, str]] = set()


@dataclass
class BatchData:
    """Decoded images of one batch; ``images[i]`` is the file ``paths[ok[i]]``."""

    images: torch.Tensor
    ok: list[int]
    errors: dict[int, ImageError] = field(default_factory=dict)


class Loader:
    """Decodes batches of files; see the module docstring. Use as a context manager or close."""

    name = "cpu"

    def __init__(self, device: torch.device, workers: int = 2) -> None:
        if workers < 1:
            raise UserError(f"--workers must be at least 1, got {workers}")
        self.device, self.workers = torch.device(device), workers
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=f"load-{self.name}")

    def load_batch(self, paths: list[Path], shape: tuple[int, int, int],
                   max_pixels: int) -> BatchData:
        """Decode ``paths`` to float32 (n_ok, C, H, W) in [0, 1] on the loader's device."""
        c, h, w = shape
        arrays = self._pillow(paths, range(len(paths)), shape, max_pixels)
        ok = [i for i in range(len(paths)) if isinstance(arrays[i], np.ndarray)]
        errors = {i: a for i, a in arrays.items() if isinstance(a, ImageError)}
        if not ok:
            return BatchData(torch.empty((0, c, h, w), device=self.device), [], errors)
        u8 = torch.from_numpy(np.stack([arrays[i] for i in ok])).to(self.device)
        return BatchData(u8.float().div_(255.0), ok, errors)

    def _pillow(self, paths, indices, shape, max_pixels) -> dict[int, np.ndarray | ImageError]:
        c, h, w = shape
        futures = {i: self._pool.submit(load_image, paths[i], c, (h, w), max_pixels)
                   for i in indices}
        out: dict[int, np.ndarray | ImageError] = {}
        for i, fut in futures.items():
            try:
                out[i] = fut.result()
            except ImageError as exc:
                out[i] = exc
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _FastLoader(Loader):
    """Shared by ``dali`` and ``nvjpeg``: route by header, fast-decode in chunks, finish."""

    formats: tuple[str, ...] = ("JPEG", "PNG")

    def load_batch(self, paths, shape, max_pixels) -> BatchData:
        c, h, w = shape
        result: dict[int, torch.Tensor | np.ndarray | ImageError] = {}
        slow: list[int] = []

        def probe(i: int) -> np.ndarray | None:
            return _probe(paths[i], max_pixels, self.formats)

        # A window of files at a time: encoded bytes and full-size decodes stay bounded.
        for start in range(0, len(paths), _CHUNK):
            window = range(start, min(start + _CHUNK, len(paths)))
            encoded = dict(zip(window, self._pool.map(probe, window)))
            chunk = [i for i in window if encoded[i] is not None]
            slow += [i for i in window if encoded[i] is None]
            for attempt in range(_RETRIES + 1):
                if not chunk:
                    break
                try:
                    rgb = self._decode([encoded[i] for i in chunk])
                except _DecodeFailed as exc:
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
        tensor when all have one size; raises _DecodeFailed."""
        raise NotImplementedError


class _DecodeFailed(Exception):
    """A fast decoder failed on a chunk; ``sample`` is the failing position when known."""

    def __init__(self, reason: str, sample: int | None = None) -> None:
        super().__init__(reason)
        self.sample = sample


class DaliLoader(_FastLoader):
    name = "dali"

    def __init__(self, device: torch.device, workers: int = 2) -> None:
        super().__init__(device, workers)
        self._pipe = None
        self._lock = threading.Lock()  # a DALI pipeline is driven by one thread at a time

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device.type == "cuda"
        device_id = (self.device.index or 0) if gpu else None

        @pipeline_def(batch_size=_CHUNK, num_threads=self.workers, device_id=device_id,
                      prefetch_queue_depth=1)
        def decode():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            # EXIF orientation is ignored, as Pillow's load_image does; fancy upsampling makes
            # the GPU's chroma upsampling that of libjpeg-turbo.
            extra = {"jpeg_fancy_upsampling": True} if gpu else {}
            return fn.decoders.image(encoded, device="mixed" if gpu else "cpu",
                                     output_type=types.RGB, adjust_orientation=False, **extra)

        pipe = decode()
        pipe.build()
        return pipe

    def _decode(self, encoded):
        with self._lock:
            if self._pipe is None:
                self._pipe = self._build()
            try:
                self._pipe.feed_input("encoded", encoded)
                (out,) = self._pipe.run()
            except Exception as exc:
                self._pipe = None  # DALI declares a pipeline invalid after an error
                # DALI names the sample it could not decode; the others are retried.
                found = re.search(r"Failed to decode sample #(\d+)", str(exc))
                sample = int(found.group(1)) if found else None
                reason = found.group(0) if found else str(exc).strip().splitlines()[-1][:200]
                raise _DecodeFailed(reason, sample) from exc
            # Same-size outputs (the common case) move as one tensor, others one by one.
            dense = out.is_dense_tensor()
            parts = [out.as_tensor()] if dense else [out[i] for i in range(len(out))]
            if self.device.type == "cuda":
                from nvidia.dali.plugin.pytorch import feed_ndarray

                stream = torch.cuda.current_stream(self.device)
                images = []
                for t in parts:
                    dst = torch.empty(t.shape(), dtype=torch.uint8, device=self.device)
                    feed_ndarray(t, dst, cuda_stream=stream)  # device to device, no host copy
                    images.append(dst)
                # DALI reuses its output buffers on the next run: finish the copies first.
                stream.synchronize()
            else:
                images = [torch.from_numpy(np.array(t)) for t in parts]  # copies out of DALI
            if dense:
                return images[0].permute(0, 3, 1, 2)
            return [t.permute(2, 0, 1) for t in images]

    def close(self) -> None:
        self._pipe = None
        super().close()


class NvjpegLoader(_FastLoader):
    name = "nvjpeg"
    formats = ("JPEG",)

    def _decode(self, encoded):
        from torchvision.io import ImageReadMode, decode_jpeg

        data = [torch.from_numpy(e) for e in encoded]
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError as exc:
            raise _DecodeFailed(str(exc).strip().splitlines()[-1][:200]) from exc


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


def loader_unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why loader ``name`` cannot run on ``device``, or None when it can."""
    if name == "dali":
        try:
            import nvidia.dali  # noqa: F401
        except ImportError:
            return "NVIDIA DALI is not installed; pip install 'apudae-engine[dali]'"
    elif name == "nvjpeg":
        if device.type != "cuda":
            return "it decodes on a CUDA device and none is in use; use --loader cpu or dali"
        try:
            from torchvision.io import decode_jpeg  # noqa: F401
        except ImportError:
            return (f"torchvision is not installed; install the torchvision release built for "
                    f"your torch {torch.__version__} (an unmatched one replaces torch)")
    return None


def get_loader(name: str = "auto", device: torch.device | str = "cpu",
               workers: int = 2) -> Loader:
    """The loader ``name`` (``auto``, ``cpu``, ``dali``, ``nvjpeg``) for ``device``.

    ``auto`` takes DALI, then nvjpeg, on a CUDA device and the cpu loader otherwise, and logs
    its choice once. An explicit choice that cannot run raises :class:`BackendUnavailable`
    naming what to install.
    """
    device = torch.device(device)
    if name not in ("auto", *LOADERS):
        raise UserError(f"unknown loader {name!r}; choose auto, {', '.join(LOADERS)}")
    if name == "auto":
        name = "cpu"
        if device.type == "cuda":
            usable = [n for n in ("dali", "nvjpeg") if loader_unavailable_reason(n, device) is None]
            name = usable[0] if usable else "cpu"
        if (name, device.type) not in _logged:
            _logged.add((name, device.type))
            log.info("loader auto: using %s on %s", name, device.type)
    else:
        reason = loader_unavailable_reason(name, device)
        if reason is not None:
            raise BackendUnavailable(f"loader {name!r} cannot run here: {reason}")
    return {"cpu": Loader, "dali": DaliLoader, "nvjpeg": NvjpegLoader}[name](device, workers)
