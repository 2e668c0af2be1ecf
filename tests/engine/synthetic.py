"""Synthetic data and tiny models for tests (importable from test modules)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from apudae_engine.method.checkpoint import CheckpointMeta, save_checkpoint
from apudae_engine.method.models import REDNet, SmallCNN
from apudae_engine.method.purification import reconstruction_errors


def make_digits(n: int, seed: int = 0, size: int = 28) -> np.ndarray:
    """Smooth blob images (uint8, N x size x size), enough structure for a DAE to differ on."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = np.zeros((n, size, size), np.float32)
    for i in range(n):
        for _ in range(3):
            cy, cx = rng.uniform(6, size - 6, 2)
            s = rng.uniform(2, 5)
            out[i] += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    return np.clip(out * 255, 0, 255).astype(np.uint8)


def build_tiny_model(folder: Path, channels: int = 1, size: int = 28, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    dae = REDNet(channels=channels, layers=2, width=8).eval()
    clean = torch.from_numpy(make_digits(64, seed, size)).unsqueeze(1).float() / 255
    if channels == 3:
        clean = clean.repeat(1, 3, 1, 1)
    r = reconstruction_errors(dae, clean).double()
    cal = {"mu": float(r.mean()), "sigma": float(r.std()), "n": 64, "data": "synthetic blobs"}
    save_checkpoint(dae, folder / "dae", CheckpointMeta("dae", (channels, size, size),
                                                        calibration=cal,
                                                        training={"command": "test fixture"}))
    clf = SmallCNN(channels, 10, size).eval()
    save_checkpoint(clf, folder / "classifier",
                    CheckpointMeta("classifier", (channels, size, size),
                                   labels=[f"c{i}" for i in range(10)]))
    return folder
