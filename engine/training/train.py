"""Training the denoising autoencoder and the classifier on a local dataset.

Both write a checkpoint (safetensors + JSON) whose metadata records the exact command, the
seed, the data splits and the metrics, and a plain-text log beside it.
"""

from __future__ import annotations

import logging
import math
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from apudae_engine.core.progress import progress
from apudae_engine.images.datasets import ImageSet, load_dataset
from apudae_engine.method.checkpoint import CheckpointMeta, save_checkpoint
from apudae_engine.method.models import REDNet, ResNet18, SmallCNN

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Settings shared by both trainers; validated on construction."""

    dataset: str = "fashion-mnist"
    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    limit: int | None = None  # use only the first N training images (smoke tests)
    data_dir: str | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs and batch_size must be >= 1 and lr > 0")


def _command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["apudae-engine", *sys.argv[1:]])


def _batches(n: int, batch: int, gen: torch.Generator):
    perm = torch.randperm(n, generator=gen)
    for i in range(0, n, batch):
        yield perm[i:i + batch]


@contextmanager
def _file_log(stem: Path) -> Iterator[None]:
    """Copy the package's INFO log lines to ``<stem>.log`` (the training log beside the weights)."""
    handler = logging.FileHandler(stem.with_suffix(".log"), mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    handler.setLevel(logging.INFO)
    # The log keeps the per-epoch record; progress lines are for whoever watches the run.
    handler.addFilter(lambda record: record.name != "apudae_engine.progress")
    pkg = logging.getLogger("apudae_engine")
    old_level = pkg.level
    if pkg.getEffectiveLevel() > logging.INFO:
        pkg.setLevel(logging.INFO)
    pkg.addHandler(handler)
    try:
        yield
    finally:
        pkg.removeHandler(handler)
        pkg.setLevel(old_level)
        handler.close()


@torch.no_grad()
def _dae_eval(model: nn.Module, data: ImageSet, noise_std: float, seed: int) -> dict[str, float]:
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    mse_noisy = mse_clean = 0.0
    for i in range(0, len(data), 500):
        x = data.images[i:i + 500].float() / 255
        noisy = (x + noise_std * torch.randn(x.shape, generator=gen)).clamp(0, 1)
        mse_noisy += F.mse_loss(model(noisy), x, reduction="sum").item()
        mse_clean += F.mse_loss(model(x), x, reduction="sum").item()
    n = data.images[:, :1].numel() * data.images.shape[1]
    return {"denoise_mse": mse_noisy / n, "clean_recon_mse": mse_clean / n,
            "denoise_psnr_db": 10 * math.log10(1.0 / max(mse_noisy / n, 1e-12))}


def train_dae(config: TrainConfig, out_stem: str | Path, layers: int = 4, width: int = 32,
              noise_std: float = 0.2) -> dict[str, Any]:
    """Train a REDNet denoiser on Gaussian-noised images (MSE to the clean image).

    Inputs are ``clip(x + N(0, noise_std^2), 0, 1)``. Metrics on the held-out calib split are
    recorded. Returns the metrics; the checkpoint lands at ``out_stem``.{json,safetensors}.
    """
    out_stem = Path(out_stem)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    with _file_log(out_stem):
        torch.manual_seed(config.seed)
        train = load_dataset(config.dataset, "train", config.data_dir).subset(config.limit)
        held = load_dataset(config.dataset, "calib", config.data_dir,
                            tuple(train.images.shape[1:])).subset(2000)
        c, h, w = train.images.shape[1:]
        model = REDNet(channels=c, layers=layers, width=width)
        opt = torch.optim.Adam(model.parameters(), lr=config.lr)
        gen = torch.Generator().manual_seed(config.seed)
        log.info("train-dae: %s, %d images, REDNet layers=%d width=%d, noise std %.3f",
                 train.source, len(train), layers, width, noise_std)
        t0 = time.perf_counter()
        for epoch in range(1, config.epochs + 1):
            model.train()
            total, seen = 0.0, 0
            bar = progress(total=len(train), desc=f"dae epoch {epoch}/{config.epochs}", unit="img",
                           min_interval=30)
            for idx in _batches(len(train), config.batch_size, gen):
                x = train.images[idx].float() / 255
                noisy = (x + noise_std * torch.randn(x.shape, generator=gen)).clamp(0, 1)
                loss = F.mse_loss(model(noisy), x)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
                seen += len(idx)
                bar.update(len(idx))
                bar.set_postfix(mse=f"{total / seen:.5f}")
            bar.close()
            metrics = _dae_eval(model, held, noise_std, config.seed)
            log.info("epoch %d: train mse %.5f, calib-split denoise mse %.5f (%.2f dB), clean "
                     "recon mse %.5f", epoch, total / seen, metrics["denoise_mse"],
                     metrics["denoise_psnr_db"], metrics["clean_recon_mse"])
        metrics["train_mse"] = total / seen
        metrics["train_seconds"] = round(time.perf_counter() - t0, 1)
        model.eval()
        training = {"command": _command_line(), "config": asdict(config), "noise_std": noise_std,
                    "data": train.source, "metrics_data": held.source, "metrics": metrics,
                    "torch": torch.__version__}
        save_checkpoint(model, out_stem, CheckpointMeta("dae", (c, h, w), training=training))
        log.info("saved %s.json (calibrate it before adaptive purification)", out_stem)
        return metrics


@torch.no_grad()
def accuracy(model: nn.Module, data: ImageSet, batch: int = 1000) -> float:
    """Top-1 accuracy (fraction) of ``model`` on ``data``."""
    model.eval()
    correct = 0
    for i in range(0, len(data), batch):
        x = data.images[i:i + batch].float() / 255
        correct += (model(x).argmax(1) == data.labels[i:i + batch]).sum().item()
    return correct / max(len(data), 1)


def train_classifier(config: TrainConfig, out_stem: str | Path, arch: str = "small_cnn",
                     augment: bool = False) -> dict[str, Any]:
    """Train a classifier with cross-entropy; records calib and test accuracy.

    ``augment`` adds random horizontal flips and 4-pixel shifts (for CIFAR-size colour data).
    """
    out_stem = Path(out_stem)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    with _file_log(out_stem):
        torch.manual_seed(config.seed)
        train = load_dataset(config.dataset, "train", config.data_dir).subset(config.limit)
        held = load_dataset(config.dataset, "calib", config.data_dir,
                            tuple(train.images.shape[1:]))
        c, h, w = train.images.shape[1:]
        classes = len(train.classes)
        model = (SmallCNN(c, classes, h) if arch == "small_cnn" else ResNet18(c, classes))
        opt = torch.optim.Adam(model.parameters(), lr=config.lr)
        steps = config.epochs * math.ceil(len(train) / config.batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=steps)
        gen = torch.Generator().manual_seed(config.seed)
        log.info("train-classifier: %s, %d images, %s", train.source, len(train), arch)
        t0 = time.perf_counter()
        for epoch in range(1, config.epochs + 1):
            model.train()
            total, correct, seen = 0.0, 0, 0
            bar = progress(total=len(train), desc=f"clf epoch {epoch}/{config.epochs}", unit="img",
                           min_interval=30)
            for idx in _batches(len(train), config.batch_size, gen):
                x = train.images[idx].float() / 255
                y = train.labels[idx]
                if augment:
                    flip = torch.rand(len(idx), generator=gen) < 0.5
                    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
                    dx, dy = torch.randint(-4, 5, (2,), generator=gen).tolist()
                    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(idx)
                correct += (logits.argmax(1) == y).sum().item()
                seen += len(idx)
                bar.update(len(idx))
                bar.set_postfix(loss=f"{total / seen:.4f}", acc=f"{correct / seen:.3f}")
            bar.close()
            calib_acc = accuracy(model, held)
            log.info("epoch %d: train loss %.4f acc %.4f, calib-split acc %.4f", epoch,
                     total / seen, correct / seen, calib_acc)
        test = load_dataset(config.dataset, "test", config.data_dir)
        metrics = {"train_loss": total / seen, "train_accuracy": correct / seen,
                   "calib_accuracy": calib_acc, "test_accuracy": accuracy(model, test),
                   "test_data": test.source, "train_seconds": round(time.perf_counter() - t0, 1)}
        log.info("final: calib acc %.4f, test acc %.4f on %s", calib_acc,
                 metrics["test_accuracy"], test.source)
        training = {"command": _command_line(), "config": asdict(config), "data": train.source,
                    "metrics": metrics, "torch": torch.__version__}
        save_checkpoint(model, out_stem, CheckpointMeta("classifier", (c, h, w), training=training,
                                                         labels=list(train.classes)))
        return metrics
