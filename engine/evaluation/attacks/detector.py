"""The detector-aware attack: APGD against the detect-and-reject system.

A deployment that rejects the inputs the purifier flags (reconstruction error r(x) above the
flag threshold, ``Purifier.flag_threshold()``: the model's false-positive-rate threshold) is
defended on an input that is flagged *or* classified correctly. ``apgd-detector`` attacks
exactly that system: APGD (the schedule, EOT, restarts and best-so-far of :mod:`.apgd`) on

    mean over EOT draws of min(margin(classifier(purify(x))), kappa)
        - penalty * max(0, r(x) - (threshold - 0.1 sigma))^2 / sigma^2

with the exact gradient through the unrolled purification loop, starting from the clean
image (a random start raises r). Best-so-far keeps, per image, only iterates with r(x) under
the threshold, so every image it returns passes the detector, unless the clean image itself
is flagged and no iterate got under (then the clean image comes back, and is rejected). Early
stop: fooled on every selection draw while under the threshold.

Example::

    attack = attack_class("apgd-detector")(classifier, purifier=purifier, eps=0.05, steps=50)
    adv = attack(images, labels)        # r(adv) <= purifier.flag_threshold() where reachable
"""

from __future__ import annotations

import torch

from apudae_engine import reconstruction_error
from apudae_engine.evaluation.attacks.apgd import APGD, attack_seed
from apudae_engine.evaluation.attacks.aware import eot_objective

# r is compared with the threshold with this relative slack, so that an iterate kept here is
# still under it when scored in another batch (float sums in another order).
THRESHOLD_SLACK = 1e-5


class APGDDetector(APGD, name="apgd-detector",
                   label="APGD vs detect-and-reject, r under the flag threshold"):
    """APGD on the purified classifier's capped margin with r(x_adv) held under the flag
    threshold (see the module docstring)."""

    mode, default_loss, uses_eot = "full", "margin", True
    in_default_run = True  # evaluate's defense-aware rows: the suite and this
    penalty_from_sigmas = 0.1  # the penalty acts from threshold - this * sigma

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        threshold = self.purifier.flag_threshold()
        if threshold is None:
            raise ValueError("apgd-detector needs the purifier's flag threshold (a calibrated "
                             "DAE)")
        self.threshold = float(threshold)

    def feasible(self, adv: torch.Tensor) -> torch.Tensor:
        self._count(adv.shape[0], dae_forward=1)
        r = self.purifier.reconstruction_error(adv)
        return r <= self.threshold * (1 - THRESHOLD_SLACK)

    def objective(self, adv, y, step, restart):
        spec, pur, n = self.spec, self.purifier, adv.shape[0]
        base = spec.seed + 7_919 * restart
        seeds = [attack_seed(base, 1, step * spec.eot + k) for k in range(spec.eot)]
        self._count(n * len(seeds), purifier_forward=1, classifier_forward=1,
                    classifier_gradients=1, purifier_backward=1)
        self._count(n, dae_forward=1, dae_backward=1)
        value, grad, wrong = eot_objective("full", self.model, pur, adv, y, seeds, spec.loss,
                                           kappa=spec.kappa)
        sigma = pur.effective_sigma
        start = self.threshold - self.penalty_from_sigmas * sigma
        xr = adv.detach().requires_grad_(True)
        with torch.enable_grad():
            excess = torch.clamp(reconstruction_error(pur.dae, xr) - start, min=0.0) / sigma
            penalty = spec.penalty * excess * excess
            (g,) = torch.autograd.grad(penalty.sum(), xr)
        return value - penalty.detach(), grad - g, wrong

    def _start(self, x: torch.Tensor, restart: int) -> torch.Tensor:
        return x.clone() if restart == 0 else super()._start(x, restart)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        adv = super().forward(x, y)
        under = self.purifier.reconstruction_error(adv) <= self.threshold
        self.budget.settings.update(threshold=self.threshold, penalty=self.spec.penalty,
                                    kappa=self.spec.kappa,
                                    penalty_from=f"threshold - {self.penalty_from_sigmas} sigma",
                                    start="clean image, then random starts",
                                    under_threshold_count=int(under.sum()))
        return adv
