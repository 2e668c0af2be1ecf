"""Fixtures for engine tests: a tiny calibrated DAE + classifier pair and image folders."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from synthetic import build_tiny_model, make_digits


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A folder holding dae.json/.safetensors and classifier.json/.safetensors (1x28x28)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """Ten PNG images in two sub-folders."""
    root = tmp_path / "images"
    for i, arr in enumerate(make_digits(10, seed=1)):
        sub = root / ("a" if i < 5 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr, "L").save(sub / f"img{i}.png")
    return root
