"""One decoded batch through the purifier (and classifier), and what may be output of it.

``purify``, ``purify-ray`` and the Ray Data API (in their actors) and ``serve`` all purify
through :class:`BatchPurifier`; each maps the per-image :class:`ImageOutcome` to its own
shape (a manifest record, a dataset row, a JSON result). The one rule for an output:

- ``error``: the purified pixels, ``r_before`` or ``r_after`` hold NaN or Inf (they would
  quantise to black): never an output, an error naming the image;
- ``rejected``: flagged as likely adversarial (``r_before`` above the flag threshold) when
  flagged images are rejected (``--reject-flagged``): no output, an explicit status;
- ``ok``: the purified image is the output.

Example::

    batches = BatchPurifier(Purifier.from_pretrained("fmnist"), reject_flagged=True)
    done = batches(x, ids, ["a.png", "b.png"])   # x: (N, C, H, W) float in [0, 1]
    [o.status for o in done.outcomes]            # e.g. ["ok", "rejected"]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from apudae_engine.backends.purifier import Purifier
from apudae_engine.core.errors import UserError
from apudae_engine.method.purification import PurifyResult

OK, REJECTED, ERROR = "ok", "rejected", "error"
NOT_FINITE = "purified result holds NaN or Inf (check the model's weights and calibration)"


@dataclass(frozen=True)
class ImageOutcome:
    """What became of one image: ``status`` (``ok``, ``rejected`` or ``error``), the error
    message naming it (errors only), its errors before and after purification, the active
    steps, whether it is flagged (False for errors) and the classifier's labels before and
    after (None without a classifier)."""

    status: str
    error: str | None
    r_before: float
    r_after: float
    active_steps: int
    flagged: bool
    label_before: int | None = None
    label_after: int | None = None

    def label_fields(self, labels: list[str] | None = None) -> dict:
        """``label_before``, ``label_after`` and, with the classifier's ``labels``,
        ``class_before``, ``class_after``; nothing without a classifier, and nothing after
        purification for an image that is not output (its purified image is not given)."""
        if self.label_before is None:
            return {}
        after = self.status == OK
        fields = {"label_before": int(self.label_before)}
        if after:
            fields["label_after"] = int(self.label_after)
        if labels:
            fields["class_before"] = labels[int(self.label_before)]
            if after:
                fields["class_after"] = labels[int(self.label_after)]
        return fields


@dataclass
class PurifiedBatch:
    """``images``: the purified (N, C, H, W) batch on the input's device (only rows whose
    outcome is ``ok`` may leave the engine); ``result``: the purifier's own result (the spot
    check compares it with the reference); ``outcomes``: one per image, in order."""

    images: torch.Tensor
    result: PurifyResult
    outcomes: list[ImageOutcome]


class BatchPurifier:
    """A purifier, an optional classifier and the rejection choice, applied batch by batch.

    Args:
        purifier: the loaded ``Purifier``.
        classifier: labels before and after purification (None: no labels).
        reject_flagged: flagged images get the status ``rejected`` instead of an output; needs
            a flag threshold (a calibrated DAE), else a UserError here.
    """

    def __init__(self, purifier: Purifier, classifier: nn.Module | None = None,
                 reject_flagged: bool = False) -> None:
        self.purifier, self.classifier = purifier, classifier
        self.reject_flagged = reject_flagged
        self.threshold = purifier.flag_threshold()
        if reject_flagged and self.threshold is None:
            raise UserError("--reject-flagged needs a flag threshold and this DAE has no "
                            "calibration; run `apudae-engine calibrate --model PATH` first")

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, image_ids: torch.Tensor | None,
                 names: Sequence[str]) -> PurifiedBatch:
        """Purify ``x`` (N, C, H, W) in [0, 1] with ``image_ids`` keying the noise (None:
        pixel fingerprints); ``names`` name the images in error messages."""
        result = self.purifier.purify(x, image_ids)
        out = result.images
        r_after_t = result.error_after  # computed by the engine where it is cheaper
        if r_after_t is None:
            r_after_t = self.purifier.reconstruction_error(out)
        before = after = None
        if self.classifier is not None:
            before = self.classifier(x).argmax(1).tolist()
            after = self.classifier(out).argmax(1).tolist()
        finite = torch.isfinite(out).flatten(1).all(1).tolist()
        # One device-to-host copy per list: indexing CUDA tensors per image syncs every time.
        r_before, r_after = result.error_before.tolist(), r_after_t.tolist()
        active = result.active_steps.tolist()
        outcomes = []
        for i, name in enumerate(names):
            status, error = OK, None
            flagged = self.threshold is not None and r_before[i] > self.threshold
            if not (finite[i] and math.isfinite(r_before[i]) and math.isfinite(r_after[i])):
                status, error, flagged = ERROR, f"{name}: {NOT_FINITE}", False
            elif flagged and self.reject_flagged:
                status = REJECTED
            outcomes.append(ImageOutcome(status, error, r_before[i], r_after[i], active[i],
                                         flagged, None if before is None else before[i],
                                         None if after is None else after[i]))
        return PurifiedBatch(out, result, outcomes)
