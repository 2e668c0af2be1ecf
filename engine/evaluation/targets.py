"""The defenses of an evaluation as purifiers: the columns it scores and the targets its
defense-aware attacks craft against.

Each purifying defense is a :class:`~apudae_engine.Purifier` with its settings; ``none`` is a
:class:`NoDefense`, whose purification is the identity, so that the same attacks (and the
detector, which reads r of the input whatever purifies it) apply to the bare classifier.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from apudae_engine import Purifier, PurifyConfig, PurifyResult


def defense_configs(seed: int, tuned: dict | None, method_defaults: bool
                    ) -> dict[str, PurifyConfig]:
    """The purify settings of each purifying defense: the model's ``tuned`` purify_defaults
    (``apudae-engine tune``) unless ``method_defaults``; ``adaptive-compat`` always keeps the
    authors' own."""
    defaults = "method" if method_defaults else "model"
    configs = {"direct": PurifyConfig(method="direct", seed=seed, defaults=defaults),
               "iterative": PurifyConfig(method="iterative", seed=seed, defaults=defaults),
               "adaptive": PurifyConfig(seed=seed, defaults=defaults),
               "adaptive-compat": PurifyConfig.compat(seed=seed)}
    return {d: config.with_model_defaults(tuned) for d, config in configs.items()}


class NoDefense(Purifier):
    """The bare classifier as a purifier: ``purify`` returns the input itself (on the autograd
    graph when it is), while the DAE's reconstruction error and the flag threshold stay, so
    that a detect-and-reject system without purification can be attacked and scored too.

    Example: ``NoDefense(dae, mu, sigma).purify(x).images is x``.
    """

    defense_name = "none (the bare classifier)"

    def __init__(self, dae: torch.nn.Module, mu: float, sigma: float, seed: int = 0,
                 checkpoint=None) -> None:
        super().__init__(dae, mu, sigma, PurifyConfig(method="direct", noise=False, seed=seed),
                         checkpoint=checkpoint)

    def purify(self, x: torch.Tensor, image_ids: torch.Tensor | Sequence[int] | None = None,
               differentiable: bool = False, seed: int | None = None,
               gradient: str = "auto") -> PurifyResult:
        r = self.reconstruction_error(x)
        return PurifyResult(x, r, torch.zeros_like(r, dtype=torch.int64))

    def reference(self, x: torch.Tensor, image_ids: torch.Tensor | None = None,
                  seed: int | None = None) -> PurifyResult:
        return self.purify(x, image_ids, seed=seed)
