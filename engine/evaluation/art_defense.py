"""APuDAE as an ART defense: purification as a ``PreprocessorPyTorch``, so ART's estimators and
attacks (EOT included) run against classifier(purify(x)) with no glue.

``forward`` purifies exactly as the engine does (the purifier's settings, noise keyed by the
image). Under autograd its gradient is, by ``gradient``:

- ``full``: the exact gradient through the unrolled purification loop;
- ``bpda``: the identity (Athalye et al.'s BPDA; ``estimate_forward`` is the identity);
- ``bpda-dae``: the DAE's gradient (``estimate_forward`` is D(x) clamped to [0, 1]).

Each call draws fresh noise seeds (``seeds_for_call``). With ``eot_samples`` k > 1 a call with
autograd on returns k purified copies per image (image-major, labels repeated, as ART's
``EoTPyTorch`` does), so ART's loss gradient averages k draws; without autograd (``predict``)
it returns one draw per image.

Example::

    from art.attacks.evasion import ProjectedGradientDescentPyTorch
    from apudae_engine.evaluation.art_defense import PurificationDefense, defended_classifier

    defense = PurificationDefense(Purifier.from_pretrained("fmnist"), gradient="full",
                                  eot_samples=4)
    estimator = defended_classifier(classifier, defense, input_shape=(1, 28, 28), nb_classes=10)
    adv = ProjectedGradientDescentPyTorch(estimator, eps=0.1, eps_step=0.01,
                                          max_iter=20).generate(x, y)   # NumPy, NCHW in [0, 1]
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from apudae_engine import Purifier
from apudae_engine.evaluation.attacks.library import art, art_classifier

GRADIENTS = ("full", "bpda", "bpda-dae")
PreprocessorPyTorch = art("art.defences.preprocessor.preprocessor").PreprocessorPyTorch


class PurificationDefense(PreprocessorPyTorch):
    """APuDAE purification as an ART PyTorch preprocessor (``apply_predict`` only).

    Args:
        purifier: the defense (DAE, mu, sigma and the purification settings).
        gradient: ``full``, ``bpda`` or ``bpda-dae`` (see the module docstring).
        eot_samples: noise draws per image in a differentiable call.
        seed: first of the seed sequence the calls draw from.
    """

    def __init__(self, purifier: Purifier, gradient: str = "full", eot_samples: int = 1,
                 seed: int = 0) -> None:
        if gradient not in GRADIENTS:
            raise ValueError(f"gradient must be one of {', '.join(GRADIENTS)}, got {gradient!r}")
        if eot_samples < 1:
            raise ValueError(f"eot_samples must be at least 1, got {eot_samples}")
        device = next(purifier.dae.parameters()).device
        super().__init__(device_type="gpu" if device.type == "cuda" else "cpu",
                         is_fitted=True, apply_fit=False, apply_predict=True)
        self.purifier = purifier
        self.gradient = gradient
        self.eot_samples = eot_samples
        self.seed = seed
        self.calls = 0

    def seeds_for_call(self, call: int, draws: int | None = None) -> list[int]:
        """The noise seeds of call number ``call`` (counting from 0), one per draw."""
        k = self.eot_samples if draws is None else draws
        return [(1_000_003 * (self.seed + 1) + call * k + j) % 2**31 for j in range(k)]

    def _purify(self, x: torch.Tensor, seed: int, differentiable: bool) -> torch.Tensor:
        p = self.purifier
        if differentiable and self.gradient == "full":
            return p.purify(x, differentiable=True, seed=seed, gradient="autograd").images
        with torch.no_grad():
            out = p.purify(x, seed=seed).images
        if not differentiable:
            return out
        surrogate = self._surrogate(x)
        return surrogate + (out - surrogate).detach()  # true values, surrogate's gradient

    def _surrogate(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.gradient == "bpda" else self.purifier.dae(x).clamp(0, 1)

    def forward(self, x: torch.Tensor, y: Any = None) -> tuple[torch.Tensor, Any]:
        differentiable = torch.is_grad_enabled() and x.requires_grad
        draws = self.eot_samples if differentiable else 1
        seeds = self.seeds_for_call(self.calls, draws)
        self.calls += 1
        outs = [self._purify(x, s, differentiable) for s in seeds]
        if draws == 1:
            return outs[0], y
        out = torch.stack(outs, dim=1).flatten(0, 1)  # image-major: image 0's draws first
        if isinstance(y, torch.Tensor):
            y = y.repeat_interleave(draws, dim=0)
        elif y is not None:
            y = np.repeat(np.asarray(y), draws, axis=0)
        return out, y

    def estimate_forward(self, x: torch.Tensor, y: Any = None) -> torch.Tensor:
        """The differentiable stand-in ART backpropagates through when it cannot use
        ``forward`` (the purification itself for ``full``, the BPDA surrogate otherwise)."""
        if self.gradient == "full":
            return self.forward(x, y)[0]
        out = self._surrogate(x)
        return out.repeat_interleave(self.eot_samples, dim=0) if self.eot_samples > 1 else out

    def fit(self, x: np.ndarray, y: np.ndarray | None = None, **kwargs: Any) -> None:
        """Nothing to fit: the DAE and its calibration come trained."""


def defended_classifier(classifier: nn.Module, defense: PurificationDefense,
                        input_shape: tuple[int, ...], nb_classes: int,
                        loss: nn.Module | None = None) -> Any:
    """An ART ``PyTorchClassifier`` for classifier(purify(x)) on [0, 1] images."""
    device = next(defense.purifier.dae.parameters()).device
    return art_classifier(classifier, input_shape, nb_classes, device, loss=loss,
                          preprocessing_defences=[defense])
