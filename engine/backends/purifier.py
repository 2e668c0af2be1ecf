"""The public ``Purifier`` module: a DAE with its calibration and settings, as an nn.Module."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from apudae_engine.backends.selection import get_backend
from apudae_engine.core.host import resolve_device
from apudae_engine.method.checkpoint import Checkpoint, load_checkpoint
from apudae_engine.method.config import PurifyConfig
from apudae_engine.method.detection import flag_threshold
from apudae_engine.method.loop import PurifyResult, calibration
from apudae_engine.method.purification import reconstruction_error

log = logging.getLogger(__name__)

# Float images must lie in [0, 1]; this much rounding outside is tolerated.
RANGE_SLACK = 1e-3


class Purifier(nn.Module):
    """Adaptive DAE purification (APuDAE) in front of any classifier.

    Args:
        dae: the denoising autoencoder (put in eval mode; its parameters are frozen).
        mu: mean of the reconstruction error on clean calibration data.
        sigma: its standard deviation.
        config: purification settings (method, steps, noise, seed, ...). Without a seed the
            module draws a secret one (``config.seed`` then holds it): an attacker who knows
            the code cannot compute the noise. Give ``PurifyConfig(seed=...)`` to reproduce.
            Settings left unset take the checkpoint's tuned ``purify_defaults`` (chosen by
            ``apudae-engine tune``; ``config.defaults`` then says ``tuned``);
            ``PurifyConfig(defaults="method")`` keeps the method's own (docs/method.md).
        backend: which implementation runs the loop. The default, ``reference``, is the
            eager float32 specification: no compile step, right for small or one-off
            batches. For throughput pass ``backend="auto"`` (the compiled loop where it can
            run, about 2.3x on a CPU and more on a GPU; its first batch is checked against
            the reference) or ``"compiled"``; ``backend_report()`` says what ran. The
            ``purify``, ``purify-ray`` and ``serve`` commands use ``auto``.
        precision: ``fp32``, or ``bf16``/``fp16`` with a compiled backend.
        first_batch_check: a non-reference backend compares its first batch with the
            reference and falls back to it beyond ``verify``'s tolerance; ``verify`` and
            ``bench`` turn this off to measure the backend itself.
    Shapes: ``forward`` maps (N, C, H, W) float images in [0, 1] to purified images of the
    same shape. When ``x.requires_grad`` and grad mode is on, the whole loop stays on the
    autograd graph, so attacks can differentiate through the defense.
    Example::

        purifier = Purifier.from_pretrained("fmnist")
        logits = classifier(purifier(images))
    """

    def __init__(self, dae: nn.Module, mu: float | None, sigma: float | None,
                 config: PurifyConfig | None = None, checkpoint: Checkpoint | None = None,
                 backend: str = "reference", precision: str = "fp32",
                 first_batch_check: bool = True) -> None:
        super().__init__()
        self.backend, self.precision = backend, precision  # see apudae_engine.backends.selection
        self.first_batch_check = first_batch_check
        self.dae = dae.eval()
        for p in self.dae.parameters():
            p.requires_grad_(False)
        self.mu = None if mu is None else float(mu)
        self.sigma = None if sigma is None else float(sigma)
        # A config without a seed gets a secret one here (see PurifyConfig.seed); it is kept
        # for the module's life, so one Purifier purifies an image the same way every time.
        self.seed_is_secret = config is None or config.seed is None
        config = config or PurifyConfig()
        if checkpoint is not None:  # the model's tuned settings, where the caller left them
            config = config.with_model_defaults(checkpoint.purify_defaults)
        self.config = config.with_secret_seed()
        self.checkpoint = checkpoint
        calibration(self.config, self.mu, self.sigma)  # raises without mu and sigma
        self.eval()

    def train(self, mode: bool = True) -> Purifier:
        """Set the module's flag; the DAE itself stays in eval mode. It is frozen, so BatchNorm
        must keep its calibrated statistics even inside a model being trained."""
        super().train(mode)
        self.dae.eval()
        return self

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
        """Errors above this mark an image as likely adversarial (``method.detection``: the
        calibrated threshold at ``config.flag_fpr``, or mu + flag_k * sigma); None without
        calibration."""
        calibration = dict(self.checkpoint.calibration or {}) if self.checkpoint else {}
        calibration.setdefault("mu", self.mu)
        calibration.setdefault("sigma", self.sigma)
        return flag_threshold(calibration, self.config.flag_fpr, self.config.flag_k)

    def reconstruction_error(self, x: torch.Tensor) -> torch.Tensor:
        """r(x): (N, C, H, W) -> (N,)."""
        with torch.no_grad():
            return reconstruction_error(self.dae, x)

    def purify(self, x: torch.Tensor, image_ids: torch.Tensor | Sequence[int] | None = None,
               differentiable: bool = False, seed: int | None = None,
               gradient: str = "auto") -> PurifyResult:
        """Purify a batch and return images with per-image statistics.

        Args:
            x: (N, C, H, W) float images in [0, 1].
            image_ids: N integers (a tensor, list or array) keying each image's noise; default
                a fingerprint of its pixels.
            differentiable: keep the whole loop on the autograd graph, so gradients flow from
                the purified images back to ``x`` (attacks that know the defense). It always
                runs the float32 reference loop, whatever ``backend`` says.
            seed: the noise seed for this call only (an attack's EOT draws); default the
                module's ``config.seed``.
            gradient: with ``differentiable``, how each step's gradient is differentiated:
                ``autograd`` (double backward through the reference), ``hvp`` (one JVP and
                one VJP through the DAE, ``method.fast_gradient``: exact for a
                piecewise-linear DAE, several times cheaper), ``auto`` (``hvp`` where exact).
        Returns:
            ``PurifyResult(images (N, C, H, W), error_before (N,), active_steps (N,))``.
        Example: ``purifier.purify(x, seed=7, differentiable=True).images.sum().backward()``.
        """
        self._check_input(x)
        image_ids = _as_image_ids(image_ids, x)
        config = self.config if seed is None else self.config.with_(seed=int(seed))
        backend = get_backend(self.backend, x.device, self.precision, differentiable,
                              self.first_batch_check)
        if differentiable:
            return backend.purify(self.dae, x, self.mu, self.sigma, config, image_ids,
                                  differentiable=True, gradient=gradient)
        return backend.purify(self.dae, x, self.mu, self.sigma, config, image_ids)

    def reference(self, x: torch.Tensor, image_ids: torch.Tensor | None = None,
                  seed: int | None = None) -> PurifyResult:
        """The float32 reference result for ``x`` (what every backend is checked against);
        ``seed`` as for :meth:`purify`."""
        self._check_input(x)
        image_ids = _as_image_ids(image_ids, x)
        config = self.config if seed is None else self.config.with_(seed=int(seed))
        return get_backend("reference", x.device).purify(self.dae, x, self.mu, self.sigma,
                                                         config, image_ids)

    def backend_report(self, device: str | torch.device | None = None) -> dict:
        """What runs (or ran) this purifier's loop on ``device`` (default: the DAE's):
        ``{"requested", "backend", "precision", "fallback"}``; ``fallback`` is the reason
        ``auto`` fell back to the reference after a compiled engine failed, else None."""
        if device is None:
            device = next(self.dae.parameters()).device
        report = get_backend(self.backend, device, self.precision,
                             check=self.first_batch_check).report()
        return {"requested": self.backend, **report}

    def forward(self, x: torch.Tensor,
                image_ids: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
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
        if x.numel():
            lo, hi = (float(v) for v in torch.aminmax(x.detach()))
            # NaN fails both comparisons, so it is refused too.
            if not (lo >= -RANGE_SLACK and hi <= 1 + RANGE_SLACK):
                hint = "; divide 8-bit images by 255" if hi > 1 + RANGE_SLACK and hi <= 255 else ""
                raise ValueError(f"expected float images in [0, 1], got values from {lo:.4g} "
                                 f"to {hi:.4g}{hint}")


def _as_image_ids(image_ids: torch.Tensor | Sequence[int] | None,
                  x: torch.Tensor) -> torch.Tensor | None:
    """``image_ids`` as an int64 tensor on ``x``'s device (None stays None)."""
    if image_ids is None or isinstance(image_ids, torch.Tensor):
        return image_ids
    try:
        ids = torch.as_tensor(image_ids)
    except (TypeError, ValueError, RuntimeError):
        ids = None
    if ids is None or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError("image_ids must be integers (a tensor, list or array of N ints), got "
                        f"{type(image_ids).__name__}")
    return ids.to(device=x.device, dtype=torch.int64)
