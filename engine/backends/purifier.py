"""The public ``Purifier`` module: a DAE with its calibration and settings, as an nn.Module."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from apudae_engine.core.errors import UserError
from apudae_engine.core.host import resolve_device
from apudae_engine.method.checkpoint import Checkpoint, load_checkpoint
from apudae_engine.method.config import PurifyConfig
from apudae_engine.method.purification import PurifyResult, purify, reconstruction_error

log = logging.getLogger(__name__)


class Purifier(nn.Module):
    """Adaptive DAE purification (APuDAE) in front of any classifier.

    Args:
        dae: the denoising autoencoder (put in eval mode; its parameters are frozen).
        mu, sigma: calibration statistics of the reconstruction error on clean data.
        config: purification settings (method, steps, noise, seed, ...).
    Shapes: ``forward`` maps (N, C, H, W) float images in [0, 1] to purified images of the
    same shape. When ``x.requires_grad`` and grad mode is on, the whole loop stays on the
    autograd graph, so attacks can differentiate through the defense.
    Example::

        purifier = Purifier.from_pretrained("fmnist")
        logits = classifier(purifier(images))
    """

    def __init__(self, dae: nn.Module, mu: float | None, sigma: float | None,
                 config: PurifyConfig | None = None, checkpoint: Checkpoint | None = None,
                 backend: str = "reference", precision: str = "fp32") -> None:
        super().__init__()
        self.backend, self.precision = backend, precision  # see apudae_engine.backends.selection
        self.dae = dae.eval()
        for p in self.dae.parameters():
            p.requires_grad_(False)
        self.mu = None if mu is None else float(mu)
        self.sigma = None if sigma is None else float(sigma)
        self.config = config or PurifyConfig()
        self.checkpoint = checkpoint
        if self.config.method == "adaptive" and (self.mu is None or self.sigma is None):
            raise UserError("this DAE has no calibration (mu, sigma); run `apudae-engine "
                            "calibrate --model PATH` first, or use --method iterative/direct")

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = "fmnist",
                        config: PurifyConfig | None = None,
                        device: str | torch.device | None = "cpu",
                        backend: str = "reference", precision: str = "fp32") -> Purifier:
        """Load a bundled model by name (``fmnist``) or a DAE checkpoint by path."""
        ckpt = load_checkpoint(name_or_path, "dae")
        cal = ckpt.calibration or {}
        module = cls(ckpt.model, cal.get("mu"), cal.get("sigma"), config, checkpoint=ckpt,
                     backend=backend, precision=precision)
        return module.to(resolve_device(device))

    @property
    def effective_sigma(self) -> float | None:
        return self.config.sigma_override or self.sigma

    @property
    def input_shape(self) -> tuple[int, int, int] | None:
        return self.checkpoint.input_shape if self.checkpoint else None

    def flag_threshold(self) -> float | None:
        """Errors above mu + flag_k * sigma mark an image as likely adversarial."""
        if self.mu is None or self.sigma is None:
            return None
        return self.mu + self.config.flag_k * self.sigma

    def reconstruction_error(self, x: torch.Tensor) -> torch.Tensor:
        """r(x): (N, C, H, W) -> (N,)."""
        with torch.no_grad():
            return reconstruction_error(self.dae, x)

    def purify(self, x: torch.Tensor, image_ids: torch.Tensor | None = None,
               differentiable: bool = False) -> PurifyResult:
        """Purify a batch and return images with per-image statistics."""
        self._check_input(x)
        if differentiable:
            return purify(self.dae, x, self.config, self.mu, self.sigma, image_ids, True)
        if self.backend != "reference" or self.precision != "fp32":
            from apudae_engine.backends.selection import get_backend

            return get_backend(self.backend, x.device, self.precision).purify(
                self.dae, x, self.mu, self.sigma, self.config, image_ids)
        from apudae_engine.core.numerics import ieee_fp32_convolutions

        with torch.no_grad(), ieee_fp32_convolutions(x.device):
            return purify(self.dae, x, self.config, self.mu, self.sigma, image_ids, False)

    def forward(self, x: torch.Tensor, image_ids: torch.Tensor | None = None) -> torch.Tensor:
        differentiable = torch.is_grad_enabled() and x.requires_grad
        return self.purify(x, image_ids, differentiable=differentiable).images

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"expected NCHW images, got shape {tuple(x.shape)}")
        shape = self.input_shape
        if shape is not None and x.shape[1] != shape[0]:
            raise ValueError(f"this DAE takes {shape[0]}-channel images, got {x.shape[1]}")
        if not x.is_floating_point():
            raise ValueError(f"expected float images in [0, 1], got dtype {x.dtype}")
