"""Purification settings: one validated dataclass holding every hyper-parameter of the method."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from apudae_engine.core.choices import METHODS

# Defaults from the authors' code (docs/method.md): adaptive T=13, lr=2/255; iterative 12, 1/255.
_METHOD_DEFAULTS = {"adaptive": (13, 2.0 / 255), "iterative": (12, 1.0 / 255), "direct": (0, 0.0)}
NOISE_EPS, NOISE_MAX_SCALE = 0.7 / 255, 4.0  # the method's noise unit and amplitude cap
COMPAT_SIGMA = 0.5  # the value the authors' code silently overwrites the calibrated sigma with
# The settings `apudae-engine tune` chooses; a model's JSON may carry them as purify_defaults.
TUNABLE = ("steps", "lr", "noise_eps", "noise_max_scale")
DEFAULTS = ("model", "method", "tuned")


@dataclass(frozen=True)
class PurifyConfig:
    """How images are purified.

    Args:
        method: ``adaptive`` (APuDAE, default), ``iterative`` (fixed Adam steps on the
            reconstruction error) or ``direct`` (x' = D(x)).
        steps: optimizer steps; None takes the default (see ``defaults``; the method's own:
            13 adaptive, 12 iterative).
        lr: Adam learning rate; None takes the default (the method's: 2/255 adaptive, 1/255
            iterative).
        beta1: Adam's first-moment decay (torch's default).
        beta2: Adam's second-moment decay (torch's default).
        adam_eps: Adam's denominator epsilon (torch's default).
        noise: add the adaptive method's per-image noise (off makes it deterministic).
        noise_eps: eps_n, the noise amplitude unit; None takes the default (0.7/255).
        noise_max_scale: upper clip of ((r - mu) / (2 sigma))^2; None takes the default (4).
        seed: keys the counter-based noise together with each image's identity. None (the
            default): a secret seed drawn from the operating system's random source when a
            Purifier, folder run, server or export is set up (``with_secret_seed``), so an
            attacker who knows the code cannot compute the noise. Give a seed for
            reproducible runs.
        clip: clamp purified images to [0, 1] (the authors' code does not).
        sigma_override: use this sigma instead of the calibrated one.
        flag_fpr: flag an image as likely adversarial when its error exceeds the threshold
            that this share of clean calibration images exceeds (None: the model's own
            default, 5 %); see ``method.detection``.
        flag_k: flag when r > mu + flag_k * sigma instead (None: use ``flag_fpr``).
        defaults: where the settings of ``TUNABLE`` left at None come from. ``model`` (the
            default): the model's tuned ``purify_defaults`` (written by ``apudae-engine
            tune``) where it has them, which a ``Purifier`` built from a checkpoint applies
            (:meth:`with_model_defaults`; the config then says ``tuned``); until then, and for
            a model without them, the method's defaults. ``method``: always the method's
            defaults (docs/method.md).
    Fields left at None are filled at once with the method's defaults, so a config is always
    complete; ``unset`` remembers which they were, so that a model's tuned values may still
    replace them.
    Example: ``PurifyConfig(method="adaptive", steps=13, seed=1)``; ``PurifyConfig.compat()``
    reproduces the authors' code (sigma 0.5, no clipping, the method's defaults).
    """

    method: str = "adaptive"
    steps: int | None = None
    lr: float | None = None
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8
    noise: bool = True
    noise_eps: float | None = None
    noise_max_scale: float | None = None
    seed: int | None = None
    clip: bool = True
    sigma_override: float | None = None
    flag_fpr: float | None = None
    flag_k: float | None = None
    defaults: str = "model"
    unset: frozenset[str] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.defaults not in DEFAULTS:
            raise ValueError(f"defaults must be one of {', '.join(DEFAULTS)}, got "
                             f"{self.defaults!r}")
        default_steps, default_lr = _METHOD_DEFAULTS[self.method]
        fill = {"steps": default_steps, "lr": default_lr, "noise_eps": NOISE_EPS,
                "noise_max_scale": NOISE_MAX_SCALE}
        if self.unset is not None and not set(self.unset) <= set(TUNABLE):
            raise ValueError(f"unset may name only {', '.join(TUNABLE)}, got "
                             f"{sorted(set(self.unset) - set(TUNABLE))}")
        missing = {k for k in TUNABLE if getattr(self, k) is None}
        object.__setattr__(self, "unset", frozenset(missing | (self.unset or set())))
        for key in missing:
            object.__setattr__(self, key, fill[key])
        if self.method != "direct" and self.steps < 1:
            raise ValueError(f"steps must be at least 1 for method {self.method}, got {self.steps}")
        if self.lr < 0:
            raise ValueError(f"lr must be non-negative, got {self.lr}")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ValueError(f"Adam betas must lie in [0, 1), got {self.beta1}, {self.beta2}")
        if self.adam_eps <= 0:
            raise ValueError(f"adam_eps must be positive, got {self.adam_eps}")
        if self.noise_eps < 0 or self.noise_max_scale < 0:
            raise ValueError("noise_eps and noise_max_scale must be non-negative")
        if self.sigma_override is not None and self.sigma_override <= 0:
            raise ValueError(f"sigma_override must be positive, got {self.sigma_override}")
        if self.flag_fpr is not None and not 0.0 < self.flag_fpr < 1.0:
            raise ValueError(f"flag_fpr must lie in (0, 1), got {self.flag_fpr}")
        if self.flag_fpr is not None and self.flag_k is not None:
            raise ValueError("give flag_fpr or flag_k, not both")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must lie in [0, 2**32), got {self.seed}")

    @classmethod
    def compat(cls, **overrides: Any) -> PurifyConfig:
        """The authors' code behaviour: sigma forced to 0.5, no clipping to [0, 1], and the
        method's own defaults (a model's tuned values are for the corrected method)."""
        return cls(**{"sigma_override": COMPAT_SIGMA, "clip": False, **overrides,
                      "defaults": "method"})

    def with_model_defaults(self, purify_defaults: Mapping[str, Any] | None) -> PurifyConfig:
        """This config with the model's tuned values (a checkpoint's ``purify_defaults``: a
        table per method of ``TUNABLE`` settings) in the fields the caller left unset; itself
        when ``defaults`` is not ``model`` or the model has none for this method.

        Example: ``PurifyConfig(seed=1).with_model_defaults({"adaptive": {"steps": 20}})``
        has 20 steps; ``PurifyConfig(steps=13, seed=1)`` would keep its 13.
        """
        table = (purify_defaults or {}).get(self.method) if self.defaults == "model" else None
        changes = {k: table[k] for k in TUNABLE if table and k in table and k in self.unset}
        if not changes:
            return self
        return replace(self, **changes, defaults="tuned", unset=self.unset - set(changes))

    def require_seed(self) -> int:
        """The seed, or a ValueError when it was never set (the loop needs a concrete one)."""
        if self.seed is None:
            raise ValueError("PurifyConfig.seed is None: give a seed, or call "
                             "config.with_secret_seed() first (Purifier does)")
        return self.seed

    def with_secret_seed(self) -> PurifyConfig:
        """This config with a secret random seed in place of None (a given seed is kept)."""
        return self if self.seed is not None else replace(self, seed=secrets.randbits(32))

    def with_(self, **changes: Any) -> PurifyConfig:
        """A copy with some fields changed; a new method brings its own default steps and lr."""
        if changes.get("method", self.method) != self.method:
            changes.setdefault("steps", None)
            changes.setdefault("lr", None)
        changes.setdefault("unset", (self.unset or frozenset()) - set(changes))
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready values (``unset`` is bookkeeping and left out)."""
        out = asdict(self)
        out.pop("unset")
        return out
