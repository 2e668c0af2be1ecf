"""Oblivious attacks from torchattacks (the ``eval`` extra), crafted on the model they are
given, usually the bare classifier (the authors' setting).

FGSM, R-FGSM, PGD (L-inf, L2), C&W-L2, DeepFool and AutoAttack with the original paper's step
counts (torchattacks' ``AutoAttack`` class runs APGD/APGD-T/FAB with 10 steps; Croce & Hein
use 100, which is what ``autoattack`` here configures). Minimal-norm attacks (C&W, DeepFool)
are projected onto the eps-ball, and the budget says how many needed it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from apudae_engine.core.errors import BackendUnavailable
from apudae_engine.evaluation.attacks.base import Attack, perturbation_norm

INSTALL_HINT = ("torchattacks is not installed; `pip install --no-deps torchattacks==3.5.1 scipy` "
                "(its metadata pins torchvision and an old requests, which it never imports)")


class CountedModel(nn.Module):
    """Wraps a classifier so a library's forward and backward passes are counted per image."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.forward_images = 0
        self.backward_images = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        self.forward_images += x.shape[0]
        if out.requires_grad:
            n = x.shape[0]
            out.register_hook(lambda g: self._count_backward(n))
        return out

    def _count_backward(self, n: int) -> None:
        self.backward_images += n


def torchattacks():
    """The torchattacks module, or BackendUnavailable with the install line."""
    try:
        import torchattacks
    except ImportError:
        raise BackendUnavailable(INSTALL_HINT) from None
    return torchattacks


class LibraryAttack(Attack):
    """An attack a library implements: ``library_attack`` builds it on a counted model."""

    def library_attack(self, model: nn.Module, num_classes: int) -> tuple[Any, dict[str, Any]]:
        """(callable attack on ``model``, settings recorded in the budget)."""
        raise NotImplementedError

    def postprocess(self, raw: torch.Tensor, x: torch.Tensor,
                    settings: dict[str, Any]) -> torch.Tensor:
        return raw

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        s = self.spec
        counted = CountedModel(self.model)
        with torch.no_grad():
            num_classes = int(self.model(images[:1]).shape[1])
        attack, settings = self.library_attack(counted, num_classes)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s.seed)
            raw = attack(images, labels).detach()
        raw = self.postprocess(raw, images, settings)
        if settings.get("projected_to_eps"):
            over = perturbation_norm(raw, images, self.norm) > s.eps * (1 + 1e-6)
            settings = {**settings, "projected_count": int(over.sum())}
        self.budget = self.new_budget(images.shape[0], classifier_forward=counted.forward_images,
                                      classifier_gradients=counted.backward_images,
                                      settings=settings)
        return raw


class FGSM(LibraryAttack, name="fgsm", label="FGSM"):
    def library_attack(self, model, num_classes):
        return torchattacks().FGSM(model, eps=self.spec.eps), {}


class RFGSM(LibraryAttack, name="rfgsm", label="R-FGSM"):
    # Tramer et al.'s R+FGSM: a random sign step of eps/2, then a gradient sign step of eps/2;
    # torchattacks clamps the result to the eps-ball (the authors' code did not).
    def library_attack(self, model, num_classes):
        eps = self.spec.eps
        return torchattacks().RFGSM(model, eps=eps, alpha=eps / 2, steps=1), {"alpha": eps / 2}


class PGD(LibraryAttack, name="pgd", label="PGD"):
    default_steps, quick_steps, iterative = 40, 10, True

    def library_attack(self, model, num_classes):
        s = self.spec
        return (torchattacks().PGD(model, eps=s.eps, alpha=s.step_size, steps=s.steps,
                                   random_start=True), {"alpha": s.step_size})


class PGDL2(LibraryAttack, name="pgd-l2", label="PGD-L2"):
    norm, default_steps, quick_steps, iterative = "L2", 40, 10, True

    def library_attack(self, model, num_classes):
        s = self.spec
        return (torchattacks().PGDL2(model, eps=s.eps, alpha=s.step_size, steps=s.steps,
                                     random_start=True), {"alpha": s.step_size})


class CWL2(LibraryAttack, name="cw-l2", label="C&W-L2"):
    norm, default_steps, quick_steps, iterative = "L2", 100, 20, True

    def library_attack(self, model, num_classes):
        s = self.spec
        return (torchattacks().CW(model, c=s.cw_c, kappa=0, steps=s.steps, lr=0.01),
                {"c": s.cw_c, "kappa": 0, "lr": 0.01, "projected_to_eps": True})


class DeepFool(LibraryAttack, name="deepfool", label="DeepFool"):
    norm, default_steps, quick_steps, iterative = "L2", 50, 5, True

    def library_attack(self, model, num_classes):
        return torchattacks().DeepFool(model, steps=self.spec.steps, overshoot=0.02), {
            "overshoot": 0.02, "overshoot_on": "total perturbation", "projected_to_eps": True}

    def postprocess(self, raw, x, settings):
        # Original DeepFool scales the *total* perturbation by 1 + overshoot. torchattacks
        # scales each step instead, so its iterates approach the boundary without crossing it
        # (on the bundled fmnist model about half the images end with a ~1e-5 logit margin).
        return (x + (1 + settings["overshoot"]) * (raw - x)).clamp(0, 1)


class AutoAttack(LibraryAttack, name="autoattack", label="AutoAttack"):
    default_steps, quick_steps, iterative = 100, 10, True

    def library_attack(self, model, num_classes):
        # AutoAttack "standard" as in Croce & Hein (2020): APGD-CE, APGD-T (9 target classes),
        # FAB-T (9 target classes), Square (5000 queries), one restart each, 100 iterations.
        ta, s = torchattacks(), self.spec
        common = dict(norm="Linf", eps=s.eps, seed=s.seed, n_restarts=1)
        parts = [ta.APGD(model, steps=s.steps, loss="ce", **common),
                 ta.APGDT(model, steps=s.steps, n_classes=num_classes, **common),
                 ta.FAB(model, steps=s.steps, multi_targeted=True, n_classes=num_classes,
                        **common),
                 ta.Square(model, n_queries=s.square_queries, **common)]
        return ta.MultiAttack(parts), {
            "version": "standard", "apgd_steps": s.steps, "apgdt_steps": s.steps,
            "fab_steps": s.steps, "square_queries": s.square_queries,
            "target_classes": num_classes - 1}
