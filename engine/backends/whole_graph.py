"""The whole adaptive purification as one forward-only module, for export (``export --whole``).

:class:`WholePurification` unrolls the ``steps`` iterations of the one loop
(``apudae_engine.method.loop.run_loop``) with the forward-only step graph
(:class:`~apudae_engine.backends.step_graph.StepGraph`: r and dr/dy without autograd) as its
step and the reference update (``method.loop.keyed_update``: counter-based noise, hinge weight,
Adam) with the seed as a graph input. Nothing of the maths is restated here, so a runtime that
loads the exported program (onnxruntime, AOTInductor from
C++, TensorRT) holds no copy of it.

Graph signature (N dynamic)::

    images     float32 (N, C, H, W) in [0, 1]
    image_ids  int64 (N,)   noise identity per image; a negative value means "the image's
                            pixel fingerprint" (``image_fingerprint``, the Python API's default)
    seed       int64 ()     noise seed; a negative value means the seed exported with the graph
    ->
    purified      float32 (N, C, H, W)
    r_before      float32 (N,)   reconstruction error of the input
    r_after       float32 (N,)   reconstruction error of the purified image
    active_steps  int64 (N,)     steps at which the hinge was active (r > mu)
    flagged       bool (N,)      r_before > the flag threshold (likely adversarial)
    logits        float32 (N, K) only with a classifier appended

Example::

    graph = WholePurification(dae, mu, sigma, PurifyConfig(seed=3), flag_threshold=7.2).eval()
    ids = torch.full((8,), -1)                     # fingerprints, as Purifier.purify
    purified, r0, r1, active, flagged = graph(images, ids, torch.tensor(-1))
"""

from __future__ import annotations

import torch
from torch import nn

from apudae_engine.backends.step_graph import StepGraph
from apudae_engine.method.config import PurifyConfig
from apudae_engine.method.loop import calibration, keyed_update, run_loop
from apudae_engine.method.purification import image_fingerprint
from apudae_kernels.reference import squared_error_ref

INPUT_NAMES = ["images", "image_ids", "seed"]
OUTPUT_NAMES = ["purified", "r_before", "r_after", "active_steps", "flagged"]
DEFAULT_ID = -1  # image_ids entry (or seed) meaning "the default"


class WholePurification(nn.Module):
    """Adaptive purification (and optionally a classifier) as one exportable module.

    Args:
        dae: an eval-mode REDNet (folded into a :class:`StepGraph`; ``dae`` is untouched).
        mu, sigma: the DAE's calibration (``config.sigma_override`` replaces sigma in the
            loop, as in the reference).
        config: adaptive settings; ``config.seed`` becomes the default seed.
        flag_threshold: r_before above it flags an image (``Purifier.flag_threshold()``).
        classifier: appended to the purified images (adds the ``logits`` output).
    Shapes: see the module docstring.
    """

    def __init__(self, dae: nn.Module, mu: float, sigma: float, config: PurifyConfig,
                 flag_threshold: float, classifier: nn.Module | None = None) -> None:
        super().__init__()
        if config.method != "adaptive":
            raise ValueError(f"the whole-loop graph implements the adaptive method, got "
                             f"{config.method!r}")
        self.step = StepGraph(dae, torch.float32).eval()
        self.config = config.with_secret_seed()  # the artifact's default seed
        self.mu, self.sigma = calibration(config, mu, sigma)
        self.flag_threshold = float(flag_threshold)
        self.classifier = None if classifier is None else classifier.eval()

    @property
    def output_names(self) -> list[str]:
        return self.output_names_for(self.classifier is not None)

    @staticmethod
    def output_names_for(with_classifier: bool) -> list[str]:
        return OUTPUT_NAMES + (["logits"] if with_classifier else [])

    def forward(self, images: torch.Tensor, image_ids: torch.Tensor, seed: torch.Tensor):
        c = self.config
        ids = torch.where(image_ids < 0, image_fingerprint(images), image_ids)
        seed = torch.where(seed < 0, torch.full_like(seed, c.seed), seed)
        update = keyed_update(c, self.mu, self.sigma, ids, hinge=True, seed=seed)
        res = run_loop(images, c.steps, self.mu, self.step, update, c.clip)
        out, r_before, active = res.images, res.error_before, res.active_steps
        r_after = squared_error_ref(out, self.step.net(out))
        flagged = r_before > self.flag_threshold
        outputs = (out, r_before, r_after, active, flagged)
        if self.classifier is not None:
            outputs = outputs + (self.classifier(out),)
        return outputs


def default_inputs(images: torch.Tensor, image_ids: torch.Tensor | None = None,
                   seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The graph's three inputs with the Python API's defaults filled in (fingerprint ids,
    the exported seed) where ``image_ids`` or ``seed`` is None."""
    n = images.shape[0]
    ids = (torch.full((n,), DEFAULT_ID, dtype=torch.int64) if image_ids is None
           else image_ids.to(torch.int64).reshape(n))
    s = torch.tensor(DEFAULT_ID if seed is None else int(seed), dtype=torch.int64)
    return images.float(), ids.to(images.device), s.to(images.device)
