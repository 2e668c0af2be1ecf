"""Fixtures of the folder tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from apudae_engine.backends.purifier import Purifier
from apudae_engine.method.config import PurifyConfig


@pytest.fixture
def flag_k(tiny_model, image_folder) -> str:
    """A --flag-k that flags half the folder's images: its threshold lies halfway between the
    5th and 6th errors (far from both, so that no batch's rounding moves an image across)."""
    purifier = Purifier.from_pretrained(tiny_model, PurifyConfig(seed=0))
    files = sorted(image_folder.rglob("*.png"))
    x = torch.stack([torch.from_numpy(np.array(Image.open(f)))[None] for f in files]) / 255
    r = purifier.reconstruction_error(x.float()).sort().values
    threshold = float(r[4] + r[5]) / 2
    return repr((threshold - purifier.mu) / purifier.sigma)


@pytest.fixture
def poison_result(monkeypatch):
    """``poison_result(row, value)``: every batch's purified image ``row`` gets one pixel
    ``value`` (NaN, Inf), as a broken model would give."""
    def poison(row: int, value: float) -> None:
        real = Purifier.purify

        def poisoned(self, x, ids=None, differentiable=False):
            res = real(self, x, ids, differentiable)
            res.images[row, 0, 0, 0] = value
            return res

        monkeypatch.setattr(Purifier, "purify", poisoned)

    return poison
