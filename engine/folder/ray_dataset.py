"""Purification on Ray Data: a ``map_batches`` callable and a Dataset helper.

Past one machine the engine runs on Ray Data's actor pools instead of a scheduler of its own::

    import ray
    from apudae_engine.folder.ray_dataset import purify_dataset

    ds = ray.data.read_binary_files("/mnt/shared/images", include_paths=True)
    out = purify_dataset(ds, "fmnist", root="/mnt/shared/images", batch_size=512,
                         concurrency=4, num_gpus=1)      # lazy; nothing has run yet
    out.write_parquet("/mnt/shared/purified")

Each actor loads the model once (:class:`PurifyBatches`). A batch is a ``dict`` of numpy
columns with either ``image`` (arrays, e.g. from ``ray.data.read_images``) or ``bytes``
(encoded files, from ``ray.data.read_binary_files``, decoded by the engine's own decoder, so
conversion and error messages are those of the ``cpu`` loader). The noise of each image is
keyed by a stable identity, so results do not depend on how Ray cuts the data into batches or
which actor gets them:

1. the ``path`` column, relative to ``root``, through the same hash as ``apudae-engine purify``
   (with the input folder as ``root``, the two give the same images);
2. else an ``id`` column (integers as given, strings hashed);
3. else a fingerprint of the pixels (the Python API's default).

``apudae_engine.folder.ray_run`` builds ``apudae-engine purify-ray`` on these. Ray is imported only
inside functions: ``pip install 'apudae-engine[ray]'``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from apudae_engine.core.errors import BackendUnavailable, UserError
from apudae_engine.folder.contract import path_identity
from apudae_engine.images.codec import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    conform_image,
    decode_image,
    encode_png,
)
from apudae_engine.method.config import PurifyConfig

if TYPE_CHECKING:
    from ray.data import Dataset

log = logging.getLogger(__name__)
_LAYOUT = "expected (H, W), (H, W, C) or (C, H, W) with C in 1 to 4"


def import_ray():
    """``ray`` with its ``data`` library, or one clear error saying what to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise BackendUnavailable("Ray Data is not installed; pip install "
                                 "'apudae-engine[ray]'") from None
    return ray


class PurifyBatches:
    """A callable class for ``Dataset.map_batches``: each actor loads the model once.

    Args:
        model: the DAE, as for :meth:`Purifier.from_pretrained`; so are ``config``,
            ``device``, ``backend`` and ``precision`` (``device="auto"`` takes the actor's
            GPU when Ray gave it one).
        classifier: None for the model's bundled classifier, ``"none"`` to skip, or a path;
            with one, labels before and after are added.
        root: paths in the ``path`` column are taken relative to it for the noise identity.
        encode_png: return PNG bytes in a ``png`` column instead of the ``image`` column.
        max_pixels: larger encoded files are refused (decompression bombs).
        reject_flagged: flagged rows get the status ``rejected`` and no image (zeros, or
            empty PNG bytes) instead of their purified image.
    Input columns: ``image`` (uint8, 16-bit grey or float in [0, 1]; (H, W), (H, W, C) or
    (C, H, W), taken as (H, W, C) when the last axis has at most 4 entries) or ``bytes``;
    optional ``path`` (``root`` must be a prefix of its values) or ``id``; other columns are
    passed through.
    Output columns: ``image`` uint8 (N, H, W, C) at the model's size (zeros for rows with
    no output), ``status`` ("ok", "rejected" or "error"; the rule is
    :mod:`apudae_engine.folder.batch`'s), ``error``, ``image_id``, ``r_before``, ``r_after``,
    ``flagged``, ``active_steps``, ``steps``, ``ran`` (what purified the row, as the actor's
    ``Purifier.backend_report()`` in JSON) and, with a classifier, ``label_before``,
    ``label_after`` (-1 on error rows; ``label_after`` -1 on rejected rows too),
    ``class_before``, ``class_after``.
    Error rows: ``bytes`` that cannot be decoded, and results holding NaN or Inf; an ``image``
    of a shape, dtype or range the engine cannot use raises :class:`UserError` naming the row.
    """

    def __init__(self, model: str | Path = "fmnist", config: PurifyConfig | None = None,
                 device: str = "auto", backend: str = "auto", precision: str = "fp32",
                 classifier: str | Path | None = None, root: str | Path | None = None,
                 encode_png: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
                 reject_flagged: bool = False) -> None:
        from apudae_engine.backends.purifier import Purifier
        from apudae_engine.core.host import resolve_device
        from apudae_engine.folder.batch import BatchPurifier
        from apudae_engine.method.checkpoint import load_classifier

        self.device = resolve_device(device)
        self.purifier = Purifier.from_pretrained(model, config, self.device, backend=backend,
                                                 precision=precision)
        if self.purifier.input_shape is None:
            raise UserError(f"{model}: checkpoint has no input shape")
        clf = load_classifier(model, classifier, self.device)
        self.clf, self.labels = (None, None) if clf is None else (clf.model, clf.meta.get("labels"))
        self.batches = BatchPurifier(self.purifier, self.clf, reject_flagged)
        self.root = None if root is None else str(root)
        self.encode_png, self.max_pixels = encode_png, max_pixels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from apudae_engine.folder.batch import ERROR, OK
        from apudae_engine.images.codec import to_uint8

        n = len(next(iter(batch.values()))) if batch else 0
        names, ids = self._identities(batch, n)
        images, errors = self._images(batch, names)
        c, h, w = self.purifier.input_shape
        ok = [i for i in range(n) if i not in errors]
        status = np.array([ERROR if i in errors else OK for i in range(n)], object)
        out_u8 = np.zeros((n, c, h, w), np.uint8)
        r_before, r_after = np.full(n, np.nan), np.full(n, np.nan)
        flagged = np.zeros(n, bool)
        active, labels_before, labels_after = (np.full(n, -1, np.int64) for _ in range(3))
        if ok:
            x = torch.stack([images[i] for i in ok]).to(self.device)
            id_t = None if ids is None else torch.tensor(ids[ok], device=self.device)
            done = self.batches(x, id_t, [names[i] for i in ok])
            if ids is None:  # report the fingerprint the purifier keyed the noise with
                from apudae_engine.method.purification import image_fingerprint

                ids = np.zeros(n, np.int64)
                ids[ok] = image_fingerprint(x).cpu().numpy()
            purified = to_uint8(done.images)
            for j, (i, o) in enumerate(zip(ok, done.outcomes)):
                status[i], r_before[i], r_after[i] = o.status, o.r_before, o.r_after
                active[i], flagged[i] = o.active_steps, o.flagged
                if o.status == ERROR:
                    errors[i] = o.error
                    continue
                if o.label_before is not None:
                    labels_before[i] = o.label_before
                if o.status == OK:
                    out_u8[i] = purified[j]
                    if o.label_after is not None:
                        labels_after[i] = o.label_after
        out = {k: v for k, v in batch.items() if k not in ("image", "bytes")}
        if self.encode_png:
            out["png"] = np.array([encode_png(out_u8[i]) if status[i] == OK else b""
                                   for i in range(n)], dtype=object)
        else:
            out["image"] = out_u8.transpose(0, 2, 3, 1)
        out["status"] = status
        out["error"] = np.array([errors.get(i, "") for i in range(n)], object)
        out["image_id"] = np.zeros(n, np.int64) if ids is None else np.asarray(ids, np.int64)
        out["r_before"], out["r_after"] = r_before, r_after
        out["active_steps"] = active
        out["steps"] = np.full(n, self.purifier.config.steps, np.int64)
        ran = json.dumps(self.purifier.backend_report(self.device), sort_keys=True)
        out["ran"] = np.array([ran] * n, dtype=object)
        out["flagged"] = flagged
        if self.clf is not None:
            out["label_before"], out["label_after"] = labels_before, labels_after
            if self.labels:
                for key, col in (("class_before", labels_before), ("class_after", labels_after)):
                    out[key] = np.array([self.labels[v] if v >= 0 else "" for v in col], object)
        return out

    def _identities(self, batch: dict[str, np.ndarray], n: int):
        """Names for messages and the noise identities (None: pixel fingerprints)."""
        if "path" in batch:
            paths = [_text(p) for p in batch["path"]]
            return paths, np.array([path_identity(self._relative(p)) for p in paths], np.int64)
        if "id" in batch:
            col = batch["id"]
            names = [f"id {v}" for v in col]
            if np.issubdtype(np.asarray(col).dtype, np.integer):
                return names, np.asarray(col, np.int64)
            return names, np.array([path_identity(_text(v)) for v in col], np.int64)
        return [f"row {i} of a batch without 'path' or 'id'" for i in range(n)], None

    def _relative(self, path: str) -> str:
        if self.root is None:
            return path
        root = self.root.rstrip("/").removeprefix("./")
        path = path.removeprefix("./")
        if root in ("", "."):
            return path
        if path.startswith(root + "/"):
            return path[len(root) + 1:]
        raise UserError(f"{path}: not under root {self.root}; its noise identity is its path "
                        "relative to root, so pass the folder the paths start with")

    def _images(self, batch: dict[str, np.ndarray], names: list[str]):
        """Float (C, H, W) tensors in [0, 1] per row, and {row: error message}."""
        import torch

        shape = self.purifier.input_shape
        images: dict[int, Any] = {}
        errors: dict[int, str] = {}
        if "bytes" in batch:
            for i, data in enumerate(batch["bytes"]):
                try:
                    u8 = decode_image(bytes(data), names[i], shape[0], shape[1:],
                                      self.max_pixels)
                except ImageError as exc:
                    errors[i] = str(exc)
                    continue
                images[i] = torch.tensor(u8, dtype=torch.float32).div_(255.0)
        elif "image" in batch:
            for i, arr in enumerate(batch["image"]):
                images[i] = _image_tensor(np.asarray(arr), names[i], shape)
        else:
            raise UserError(f"the dataset has neither an 'image' nor a 'bytes' column (columns: "
                            f"{', '.join(batch) or 'none'}); read it with ray.data.read_images "
                            "or read_binary_files")
        return images, errors


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _image_tensor(arr: np.ndarray, name: str, shape: tuple[int, int, int]):
    """One ``image`` cell -> float (C, H, W) in [0, 1] at the model's shape, by the policy."""
    import torch
    from PIL import Image

    if arr.ndim == 3 and arr.shape[-1] <= 4:
        hwc = arr
    elif arr.ndim == 3 and arr.shape[0] <= 4:
        hwc = arr.transpose(1, 2, 0)
    elif arr.ndim == 2:
        hwc = arr[:, :, None]
    else:
        raise UserError(f"{name}: image of shape {arr.shape}; {_LAYOUT}")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or arr.min(initial=0) < 0 or arr.max(initial=0) > 1:
            raise UserError(f"{name}: float image with values outside [0, 1] (or NaN); scale "
                            "it to [0, 1] or pass uint8")
        chw = np.ascontiguousarray(hwc.transpose(2, 0, 1), np.float32)
        if chw.shape == tuple(shape):  # already the model's input: used as is, not quantised
            return torch.tensor(chw)
        hwc = np.rint(hwc * 255.0).astype(np.uint8)  # converted like a decoded 8-bit file
    elif not (arr.dtype == np.uint8 or (arr.dtype == np.uint16 and hwc.shape[2] == 1)):
        raise UserError(f"{name}: image of dtype {arr.dtype}; pass uint8, 16-bit grey or float "
                        "in [0, 1]")
    pil = Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else np.ascontiguousarray(hwc))
    return torch.tensor(conform_image(pil, shape[0], shape[1:]), dtype=torch.float32).div_(255.0)


def purify_dataset(ds: Dataset, model: str | Path = "fmnist", config: PurifyConfig | None = None,
                   *, classifier: str | Path | None = None, root: str | Path | None = None,
                   device: str = "auto", backend: str = "auto", precision: str = "fp32",
                   encode_png: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
                   batch_size: int = 512, concurrency: int | tuple[int, int] | None = None,
                   num_gpus: float = 0.0, num_cpus: float | None = None,
                   reject_flagged: bool = False) -> Dataset:
    """Purify a Ray Dataset on an actor pool; returns the mapped Dataset (lazy).

    Args: see :class:`PurifyBatches` for the model and column arguments.
        batch_size: rows per call (per model forward).
        concurrency: actors: ``n`` for a fixed pool, ``(min, max)`` to autoscale, None for
            Ray's default (1 to as many as the cluster has room for).
        num_gpus: GPUs per actor (Ray's default when None/0).
        num_cpus: CPUs per actor (Ray's default when None/0).
    Example: ``purify_dataset(ray.data.read_images(DIR, include_paths=True), root=DIR)``.
    """
    ray = import_ray()
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    if concurrency is None:
        compute = ray.data.ActorPoolStrategy()
    elif isinstance(concurrency, int):
        compute = ray.data.ActorPoolStrategy(size=concurrency)
    else:
        compute = ray.data.ActorPoolStrategy(min_size=concurrency[0], max_size=concurrency[1])
    # Settled here, on the driver: actors drawing their own secret seeds would make an
    # image's result depend on which actor purified it.
    config = (config or PurifyConfig()).with_secret_seed()
    kwargs = dict(model=model, config=config, device=device, backend=backend,
                  precision=precision, classifier=classifier, root=root, encode_png=encode_png,
                  max_pixels=max_pixels, reject_flagged=reject_flagged)
    resources = {"num_gpus": num_gpus} if num_gpus else {}
    if num_cpus is not None:
        resources["num_cpus"] = num_cpus
    return ds.map_batches(PurifyBatches, fn_constructor_kwargs=kwargs, batch_size=batch_size,
                          batch_format="numpy", compute=compute, udf_modifying_row_count=False,
                          **resources)
