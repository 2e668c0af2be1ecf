"""The purification loop, written once: every path that purifies runs :func:`run_loop`.

One iteration of the iterative and adaptive methods (docs/method.md), for t = 1 .. steps::

    y = X + delta                         the state: X (input plus the noise so far), delta
    r, g = step(y)                        r(y) per image and the gradient the update takes
    error_before = r at t = 1             reported per image
    active += r > mu                      (every step counts for the iterative method)
    X, delta, m, v = update(t, state, r, g)   noise on X, hinge, one Adam step on delta
    -> clamp(X + delta, 0, 1) (no clamp with ``config.clip=False``)

What differs between paths is only how ``step`` and ``update`` are computed:

==========================  ==========================================  ===================
path                        step (y -> r, g)                            update
==========================  ==========================================  ===================
reference (the spec)        autograd: g = dL/dy (L the hinge loss)      :func:`keyed_update`
attacks' fast gradient      ``method.fast_gradient.HingeGradient``      :func:`keyed_update`
compiled CPU                compiled folded step graph: g = dr/dy       compiled ``keyed``
CUDA fixed-shape loop       compiled step graph: g = dr/dy              Triton kernel
whole-graph export          folded step graph: g = dr/dy                :func:`keyed_update`
==========================  ==========================================  ===================

``update`` always computes ``apudae_kernels.reference.adaptive_update_keyed`` (or a kernel tested
against it): noise with the amplitude of r (no gradient through it), then the hinge weight
(where ``g`` is dr/dy; ``hinge=False`` where the step already returned dL/dy), then Adam.
Calibration (mu, the sigma used, compat's override) is resolved by :func:`calibration`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from apudae_engine.core.errors import UserError
from apudae_engine.method.config import PurifyConfig
from apudae_kernels.reference import adam_scalars, adaptive_update_keyed, image_keys, step_keys

MISSING_CALIBRATION = ("adaptive purification needs the DAE's calibration statistics mu and "
                       "sigma; run `apudae-engine calibrate --model PATH` first, or use "
                       "--method iterative/direct")


@dataclass
class PurifyResult:
    """Purified images (N, C, H, W) and per-image statistics of the run.

    ``error_before`` is r(x) of the input; ``active_steps`` counts the steps at which the
    hinge was active (r > mu), i.e. steps that moved the image by gradient (direct and
    iterative methods count every step). ``error_after`` is r of the purified images where
    the engine computed it anyway (the compiled CPU loop, with its faster graph), else None.
    """

    images: torch.Tensor
    error_before: torch.Tensor
    active_steps: torch.Tensor
    error_after: torch.Tensor | None = None


@dataclass
class LoopState:
    """The loop's tensors, each shaped like the images: X (the input with the noise added so
    far), delta (what Adam optimises) and Adam's two moments."""

    x: torch.Tensor
    delta: torch.Tensor
    m: torch.Tensor
    v: torch.Tensor

    @classmethod
    def start(cls, x: torch.Tensor) -> LoopState:
        return cls(x, torch.zeros_like(x), torch.zeros_like(x), torch.zeros_like(x))


Step = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Update = Callable[[int, LoopState, torch.Tensor, torch.Tensor], LoopState]


class MissingCalibration(UserError, ValueError):
    """The adaptive method was asked for with a DAE that has no mu and sigma."""


def calibration(config: PurifyConfig, mu: float | None, sigma: float | None
                ) -> tuple[float | None, float | None]:
    """(mu, the sigma the loop uses) for ``config``: the calibrated sigma, or
    ``config.sigma_override`` (compat's 0.5) when set. Raises :class:`MissingCalibration` for
    the adaptive method without mu and sigma; the other methods take None."""
    if config.method != "adaptive":
        return mu, sigma
    if mu is None or sigma is None:
        raise MissingCalibration(MISSING_CALIBRATION)
    return float(mu), float(config.sigma_override if config.sigma_override is not None
                            else sigma)


def run_loop(x: torch.Tensor, steps: int, mu: float | None, step: Step, update: Update,
             clip: bool) -> PurifyResult:
    """The loop of the module docstring on (N, ...) images ``x``; ``mu`` None counts every
    step as active (the iterative method). Returns the purified images and statistics."""
    state = LoopState.start(x)
    n = x.shape[0]
    active = torch.zeros(n, dtype=torch.int64, device=x.device)
    error_before = None
    for t in range(1, steps + 1):
        r, g = step(state.x + state.delta)
        if error_before is None:
            error_before = r.detach().clone()
        active += 1 if mu is None else (r.detach() > mu).to(torch.int64)
        state = update(t, state, r, g)
    out = state.x + state.delta
    return PurifyResult(out.clamp(0, 1) if clip else out, error_before, active)


def keyed_update(config: PurifyConfig, mu: float | None, sigma: float | None,
                 image_ids: torch.Tensor, hinge: bool, seed: int | torch.Tensor | None = None
                 ) -> Update:
    """The update of ``config``'s method in reference ops (``adaptive_update_keyed``): noise
    keyed by (seed, image id, step) for the adaptive method with noise on, the hinge weight
    when ``hinge`` (the step returned dr/dy), then Adam. ``seed`` (an int or a 0-d int64
    tensor) defaults to ``config.seed``; ``mu`` and ``sigma`` as :func:`calibration` gives."""
    adaptive = config.method == "adaptive"
    noise = adaptive and config.noise
    keys = image_keys(config.require_seed() if seed is None else seed, image_ids) \
        if noise else image_ids

    def update(t: int, s: LoopState, r: torch.Tensor, g: torch.Tensor) -> LoopState:
        step_size, bias2_sqrt = adam_scalars(t, config.lr, config.beta1, config.beta2)
        return LoopState(*adaptive_update_keyed(
            s.x, s.delta, g, s.m, s.v, r.detach(), step_keys(keys, t) if noise else keys,
            step_size, bias2_sqrt, mu, sigma, config.noise_eps, config.noise_max_scale,
            config.beta1, config.beta2, config.adam_eps, noise, hinge=hinge and adaptive))

    return update
