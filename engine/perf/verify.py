"""Parity of a backend with the reference on the same images (``apudae-engine verify``).

Both purify the same images with the same settings and image identities (so the same noise);
the report gives the maximum and mean pixel difference, the difference of the reconstruction
error before and after purification, and, with a classifier, how often the two purified
images get the same label. Tolerances depend on the precision:

- fp32: a gradient component near zero can take the other sign after a rounding difference
  (channels-last convolutions, folded BatchNorm), and Adam then moves that pixel by up to a
  full step (lr = 2/255). So a few pixels may differ by a few steps; the mean difference must
  stay at rounding level and almost no pixel may differ by more than 1/255. Measured on 512
  fmnist test images: max 2.9e-3, mean 2.9e-7; perturbed images: max 1.8e-2, mean 1.3e-6,
  1e-4 of the pixels over 1/255.
- bf16/fp16: the maximum is reported, not bounded; the mean difference and the label
  agreement are (fmnist, 512 test images, bf16: mean 8.7e-4, label agreement 99.8 %;
  benchmarks/results/verify/).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from apudae_engine.backends.parity import TOLERANCES
from apudae_engine.method.config import PurifyConfig

__all__ = ["TOLERANCES", "VerifyReport", "folder_images", "verify_backend"]

log = logging.getLogger(__name__)

@dataclass
class VerifyReport:
    """Differences between a backend's and the reference's purified images."""

    backend: str
    precision: str
    images: int
    max_abs_diff: float = 0.0
    mean_abs_diff: float = 0.0
    frac_over_1_255: float = 0.0  # fraction of pixels differing by more than 1/255
    error_before_max_diff: float = 0.0
    error_after_max_diff: float = 0.0
    label_agreement: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    tolerances: dict[str, float | None] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def verify_backend(dae: nn.Module, images: torch.Tensor, mu: float, sigma: float,
                   config: PurifyConfig, backend: str = "auto", precision: str = "fp32",
                   device: str | torch.device = "cpu", classifier: nn.Module | None = None,
                   batch_size: int = 256, tolerances: dict[str, float | None] | None = None,
                   image_ids: torch.Tensor | None = None) -> VerifyReport:
    """Purify ``images`` (N, C, H, W) with the reference and with ``backend``; compare.

    The backend's first batch includes its compilation time (reported under ``seconds``).
    """
    from apudae_engine.backends.purifier import Purifier
    from apudae_engine.backends.selection import resolve_backend

    device = torch.device(device)
    config = config.with_secret_seed()  # the reference and the backend share one seed
    name = resolve_backend(backend, device, precision)
    dae = dae.to(device).eval()
    ref = Purifier(dae, mu, sigma, config)
    # No first-batch check: the backend must not fall back to the reference it is compared with.
    other = Purifier(dae, mu, sigma, config, backend=name, precision=precision,
                     first_batch_check=False)
    tol = {**TOLERANCES[precision], **(tolerances or {})}
    rep = VerifyReport(name, precision, int(images.shape[0]), tolerances=tol,
                       seconds={"reference": 0.0, name: 0.0})
    ids_all = torch.arange(images.shape[0]) if image_ids is None else image_ids
    if classifier is not None:
        classifier = classifier.to(device).eval()
    total_diff, agree, over = 0.0, 0, 0
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].to(device)
        ids = ids_all[start:start + batch_size].to(device)
        outs = []
        for key, be in (("reference", ref), (name, other)):
            t0 = time.perf_counter()
            outs.append(be.purify(x, ids))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            rep.seconds[key] += time.perf_counter() - t0
        a, b = outs
        diff = (a.images - b.images).abs()
        rep.max_abs_diff = max(rep.max_abs_diff, float(diff.max()))
        total_diff += float(diff.double().sum())
        over += int((diff > 1.0 / 255).sum())
        rep.error_before_max_diff = max(rep.error_before_max_diff,
                                        float((a.error_before - b.error_before).abs().max()))
        with torch.no_grad():
            ra, rb = ref.reconstruction_error(a.images), ref.reconstruction_error(b.images)
            rep.error_after_max_diff = max(rep.error_after_max_diff, float((ra - rb).abs().max()))
            if classifier is not None:
                agree += int((classifier(a.images).argmax(1) == classifier(b.images).argmax(1))
                             .sum())
    rep.mean_abs_diff = total_diff / max(1, images.numel())
    rep.frac_over_1_255 = over / max(1, images.numel())
    if classifier is not None:
        rep.label_agreement = agree / max(1, images.shape[0])
    for key, value in (("max_abs_diff", rep.max_abs_diff), ("mean_abs_diff", rep.mean_abs_diff),
                       ("frac_over_1_255", rep.frac_over_1_255)):
        if tol.get(key) is not None and value > tol[key]:
            rep.failures.append(f"{key} {value:.3g} > {tol[key]:.3g}")
    if (rep.label_agreement is not None and tol.get("label_agreement") is not None
            and rep.label_agreement < tol["label_agreement"]):
        rep.failures.append(f"label agreement {rep.label_agreement:.4f} < "
                            f"{tol['label_agreement']}")
    return rep


def folder_images(folder: str | Path, shape: tuple[int, int, int],
                  limit: int | None = None) -> torch.Tensor:
    """Images of a folder (searched recursively), resized to ``shape``: (N, C, H, W) in [0, 1].
    Unreadable files are skipped with a warning."""
    import numpy as np

    from apudae_engine.core.errors import UserError
    from apudae_engine.images.codec import ImageError, discover_images, load_image

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"input folder {folder} does not exist or is not a folder")
    arrays = []
    for path in discover_images(folder):
        if limit is not None and len(arrays) >= limit:
            break
        try:
            arrays.append(load_image(path, shape[0], shape[1:]))
        except ImageError as exc:
            log.warning("%s", exc)
    if not arrays:
        raise UserError(f"no readable images under {folder}")
    return torch.from_numpy(np.stack(arrays)).float() / 255.0
