"""A learnable synthetic task for attack tests: which quadrant's blob is brightest (4 classes).

A SmallCNN reaches high clean accuracy on it in a few seconds and, being undefended, falls to
PGD at eps 0.1. The DAE is the untrained tiny fixture DAE, calibrated on
the task's images (purification mechanics, not denoising quality, are under test).
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from apudae_engine.images.datasets import ImageSet
from apudae_engine.method.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from apudae_engine.method.models import REDNet, SmallCNN
from apudae_engine.method.purification import reconstruction_errors


def make_quadrant_task(n: int, seed: int = 0, size: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 1, size, size) with one soft blob per quadrant; label = the brightest.

    Peak brightnesses lie in [0.3, 0.8] and the brightest leads the runner-up by 0.05 to 0.15,
    so an L-inf perturbation of 0.1 can always swap them: PGD can reach zero accuracy.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    peak = rng.uniform(0.3, 0.65, (n, 4))
    top = peak.max(axis=1) + rng.uniform(0.05, 0.15, n)
    peak[np.arange(n), labels] = top
    yy, xx = np.mgrid[0:size, 0:size]
    q = size / 4
    img = np.zeros((n, size, size))
    for k in range(4):
        cy = q * (1 + 2 * (k // 2)) + rng.uniform(-1.5, 1.5, n)
        cx = q * (1 + 2 * (k % 2)) + rng.uniform(-1.5, 1.5, n)
        d2 = (yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2
        img = np.maximum(img, peak[:, k, None, None] * np.exp(-d2 / (2 * 2.5**2)))
    x = np.clip(img * 255, 0, 255).round().astype(np.uint8)[:, None]
    return torch.from_numpy(x), torch.from_numpy(labels.astype(np.int64))


def quadrant_set(n: int, seed: int = 1) -> ImageSet:
    x, y = make_quadrant_task(n, seed)
    return ImageSet(x, y, ["tl", "tr", "bl", "br"], f"quadrant blobs seed {seed} ({n})")


@functools.lru_cache(maxsize=1)
def trained_model_folder() -> Path:
    """dae.* (tiny, calibrated on task images) and classifier.* (trained) in a temp folder.

    Cached for the test session so both attack and evaluation tests share one training run.
    """
    folder = Path(tempfile.mkdtemp(prefix="apudae-quadrant-"))
    torch.manual_seed(0)
    x, y = make_quadrant_task(768, seed=0)
    xf = x.float() / 255
    dae = REDNet(channels=1, layers=2, width=8).eval()
    r = reconstruction_errors(dae, xf[:256]).double()
    cal = {"mu": float(r.mean()), "sigma": float(r.std()), "n": 256,
           "data": "quadrant blobs seed 0"}
    save_checkpoint(dae, folder / "dae", CheckpointMeta("dae", (1, 28, 28), calibration=cal))
    clf = SmallCNN(1, 4, 28)
    opt = torch.optim.Adam(clf.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        for idx in torch.randperm(len(xf), generator=gen).split(64):
            loss = F.cross_entropy(clf(xf[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    save_checkpoint(clf.eval(), folder / "classifier",
                    CheckpointMeta("classifier", (1, 28, 28), labels=["tl", "tr", "bl", "br"]))
    return folder


def load_trained():
    """(classifier, dae checkpoint) of :func:`trained_model_folder`."""
    folder = trained_model_folder()
    return load_checkpoint(folder, "classifier").model, load_checkpoint(folder, "dae")
