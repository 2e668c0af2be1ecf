"""Image loaders: a batch of files in, a float tensor on the target device out.

One interface, several implementations, registered and chosen like the compute backends::

    loader = get_loader("auto", torch.device("cuda"), workers=4)
    batch = loader.load_batch(paths, (3, 224, 224), max_pixels=64_000_000)
    batch.images     # float32 (len(batch.ok), 3, 224, 224) in [0, 1], on the device
    batch.ok         # indices into ``paths`` that decoded, ascending
    batch.errors     # {index: ImageError} for the others

- ``cpu`` (:class:`Loader`, here): Pillow in a thread pool
  (:func:`apudae_engine.images.codec.load_image`); the conversion policy of the README is
  defined by this path. The default without a GPU.
- ``dali`` (:mod:`apudae_engine.images.dali_loader`): NVIDIA DALI, on a GPU or the CPU. Extra:
  ``apudae-engine[dali]``.
- ``nvjpeg`` (:mod:`apudae_engine.images.nvjpeg_loader`): torchvision's ``decode_jpeg`` on a
  CUDA device, for GPU machines without DALI.

A loader is a :class:`Loader` subclass in its own module, with a ``name`` and an
``unavailable_reason(device)`` classmethod, and one line in
:data:`apudae_engine.core.choices.LOADER_CLASSES`; its module is imported only when it is chosen
(or ``auto`` asks whether it can run). The GPU-capable ones send every file they cannot decode
exactly as Pillow would to the ``cpu`` path (:mod:`apudae_engine.images.fast_loader`), so one
conversion policy and one error message hold for all of them.

``auto`` takes, on a CUDA device, the first usable loader registered after ``cpu`` (``dali``,
then ``nvjpeg``) and ``cpu`` otherwise. It never takes ``dali`` on the CPU: there, Pillow
threads decode as fast, and the exact resize (dense float64 matrix products) is slower than
Pillow's when shrinking large images.
"""

from __future__ import annotations

import importlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from apudae_engine.core.choices import LOADER_CHOICES, LOADER_CLASSES, LOADERS
from apudae_engine.core.errors import BackendUnavailable, UserError
from apudae_engine.images.codec import ImageError, load_image

__all__ = ["LOADERS", "BatchData", "Loader", "get_loader", "loader_class",
           "loader_unavailable_reason"]
log = logging.getLogger(__name__)
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

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> str | None:
        """Why this loader cannot run on ``device`` (one sentence naming the fix), or None."""
        return None

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


def loader_class(name: str) -> type[Loader]:
    """The :class:`Loader` subclass registered as ``name`` in ``core.choices.LOADER_CLASSES``,
    imported now; raises :class:`UserError` for a name not registered."""
    if name not in LOADER_CLASSES:
        raise UserError(f"unknown loader {name!r}; choose {', '.join(LOADER_CHOICES)}")
    module, _, attr = LOADER_CLASSES[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def loader_unavailable_reason(name: str, device: torch.device | str) -> str | None:
    """Why loader ``name`` cannot run on ``device``, or None when it can."""
    return loader_class(name).unavailable_reason(torch.device(device))


def get_loader(name: str = "auto", device: torch.device | str = "cpu",
               workers: int = 2) -> Loader:
    """The loader ``name`` (``auto`` or one of ``core.choices.LOADERS``) for ``device``.

    ``auto`` takes the first usable loader registered after ``cpu`` (DALI, then nvjpeg) on a
    CUDA device and the cpu loader otherwise, and logs its choice once. An explicit choice that
    cannot run raises :class:`BackendUnavailable` naming what to install.
    """
    device = torch.device(device)
    if name == "auto":
        name = "cpu"
        if device.type == "cuda":
            usable = [n for n in LOADERS
                      if n != "cpu" and loader_unavailable_reason(n, device) is None]
            name = usable[0] if usable else "cpu"
        if (name, device.type) not in _logged:
            _logged.add((name, device.type))
            log.info("loader auto: using %s on %s", name, device.type)
    else:
        reason = loader_unavailable_reason(name, device)
        if reason is not None:
            raise BackendUnavailable(f"loader {name!r} cannot run here: {reason}")
    return loader_class(name)(device, workers)
