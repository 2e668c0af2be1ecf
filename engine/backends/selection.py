"""Which implementation runs the purification loop: the one module that decides.

Backends (``--backend``):

- ``reference``: eager PyTorch with autograd (``reference.py``), the specification.
- ``compiled``: ``torch.compile`` of the forward-only step graph and the fused update, on CPU
  (needs a C++ compiler) and CUDA (needs triton; CUDA graphs replay the loop).
- ``tensorrt``: a TensorRT engine of the exported step graph (CUDA, the ``tensorrt`` extra).
- ``auto``: the fastest usable one for the device (CUDA: compiled; CPU: compiled when a C++
  compiler exists, else reference), except that fp32 jobs known to be smaller than
  ``AUTO_MIN_IMAGES`` run the reference (compiling would not pay); logged once.

Everything that decides what runs is here: the checks of an explicit choice, ``auto``, the
small-job rule, the autograd path for attacks, and the fallback to the reference when ``auto``
chose a compiled engine that then fails to build. ``Purifier`` and the folder runs ask
:func:`get_backend`; each backend reports what actually ran (:meth:`OptimizedBackend.report`).

Backends are a registry (``core.choices.BACKEND_MODULES``: a name and the module that
provides ``unavailable_reason`` and ``engine_for``); nothing is chosen or imported at import
time. A run on a non-reference backend checks its first images against the reference
(``backends.parity.first_batch_check``), records the difference in its report and falls back
to the reference, with one warning, when it is beyond ``apudae-engine verify``'s tolerance.

Reduced precision (``bf16``, ``fp16``) is opt-in
for the compiled and tensorrt backends and gated by a parity check against float32 on the
first batch; ``apudae-engine verify`` reports the end-to-end differences.

Example::

    backend = get_backend("auto", "cpu")
    result = backend.purify(dae, x, mu, sigma, PurifyConfig(), image_ids)
"""

from __future__ import annotations

import functools
import importlib
import logging
import weakref
from typing import Protocol

import torch
from torch import nn

from apudae_engine.backends.parity import (
    FIRST_BATCH_IMAGES,
    check_precision_parity,
    first_batch_check,
)
from apudae_engine.backends.reference import ReferenceBackend
from apudae_engine.core.choices import BACKEND_CHOICES, BACKEND_MODULES, BACKENDS
from apudae_engine.core.choices import PRECISIONS as PRECISION_NAMES
from apudae_engine.core.errors import BackendUnavailable, UserError
from apudae_engine.core.numerics import ieee_fp32_convolutions
from apudae_engine.method.config import PurifyConfig
from apudae_engine.method.loop import PurifyResult, calibration
from apudae_engine.method.purification import checked_image_ids

__all__ = ["BACKENDS", "CHOICES", "PRECISIONS", "Backend", "OptimizedBackend",
           "ReferenceBackend", "backend_for_job", "check_precision_parity", "get_backend",
           "resolve_backend", "unavailable_reason"]
log = logging.getLogger(__name__)

CHOICES = BACKEND_CHOICES
PRECISIONS = dict(zip(PRECISION_NAMES, (torch.float32, torch.bfloat16, torch.float16),
                      strict=True))
# ``auto`` compiles only for jobs at least this large. Compiling costs about 6 s on the CPU even
# with warm caches, and the compiled loop is about 2.5x the reference's ~100 img/s there, so it
# pays from roughly 1,000 images on (benchmarks/results/small_job_compile_cpu.md).
AUTO_MIN_IMAGES = 1000
_logged: set[tuple] = set()


def _log_once(key: tuple, level: int, msg: str, *args) -> None:
    if key not in _logged:
        _logged.add(key)
        log.log(level, msg, *args)


class Backend(Protocol):
    name: str
    precision: str

    def purify(self, dae: nn.Module, x: torch.Tensor, mu: float | None, sigma: float | None,
               config: PurifyConfig, image_ids: torch.Tensor | None = None) -> PurifyResult:
        """Purify (N, C, H, W) images in [0, 1] like ``reference.purify`` (no gradient)."""
        ...


def _module(name: str):
    return importlib.import_module(BACKEND_MODULES[name])


def unavailable_reason(name: str, device: str | torch.device = "cpu",
                       precision: str = "fp32") -> str | None:
    """None when backend ``name`` can run on ``device`` in ``precision``, else why not and
    the fix, as one sentence (each backend's module says, see ``core.choices``)."""
    if precision not in PRECISIONS:
        return f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}"
    if name not in BACKEND_MODULES:
        return f"unknown backend {name!r}; choose one of {', '.join(CHOICES)}"
    return _module(name).unavailable_reason(torch.device(device), precision)


def resolve_backend(name: str, device: str | torch.device = "cpu",
                    precision: str = "fp32") -> str:
    """The concrete backend for ``name`` on ``device``; raises BackendUnavailable (a one-line
    user error naming the fix) when an explicit choice cannot run here. ``auto`` takes
    ``compiled`` where it can run, else ``reference``; the choice is logged once."""
    device = torch.device(device)
    if name != "auto":
        reason = unavailable_reason(name, device, precision)
        if reason is not None:
            raise BackendUnavailable(f"backend {name!r} cannot run here: {reason}")
        return name
    skipped = unavailable_reason("compiled", device, precision)
    if skipped is not None:
        if precision != "fp32":
            raise BackendUnavailable(f"no backend runs precision {precision} on {device}: "
                                     f"{skipped}")
        _log_once((str(device), precision, "reference"), logging.INFO,
                  "backend auto -> reference on %s (%s); compiled unavailable: %s", device,
                  precision, skipped)
        return "reference"
    _log_once((str(device), precision, "compiled"), logging.INFO,
              "backend auto -> compiled on %s (%s)", device, precision)
    return "compiled"


def backend_for_job(name: str, precision: str, n_images: int,
                    device: str | torch.device | None = None) -> str:
    """The ``backend`` to give a Purifier for a job of ``n_images`` images.

    ``auto`` in fp32 becomes ``reference`` for jobs under ``AUTO_MIN_IMAGES`` images
    (compiling would cost more than it saves); otherwise ``name`` is kept, so ``auto`` keeps
    its fallback on a failed compile. With ``device``, an unusable choice raises here,
    before any work starts (Ray's driver passes none: the actors' devices decide).
    """
    if device is not None:
        resolve_backend(name, device, precision)
    if name == "auto" and precision == "fp32" and n_images < AUTO_MIN_IMAGES:
        log.info("backend auto -> reference: %d images are fewer than %d, too few to repay "
                 "compiling (--backend compiled forces it)", n_images, AUTO_MIN_IMAGES)
        return "reference"
    return name


def get_backend(name: str = "auto", device: str | torch.device = "cpu",
                precision: str = "fp32", differentiable: bool = False,
                check: bool = True) -> Backend:
    """The backend object for ``name`` on ``device`` (cached; ``auto`` resolved here).

    ``differentiable=True`` (attacks that take gradients through the loop) always gives the
    reference: it is the only path that keeps the loop on the autograd graph. ``check``: a
    non-reference backend checks its first batch against the reference and falls back to it
    beyond tolerance (``verify`` and ``bench`` measure the backend itself and turn it off).
    """
    device = torch.device(device)
    if differentiable:
        return _make_backend("reference", str(device), "fp32")
    resolved = resolve_backend(name, device, precision)
    return _make_backend(resolved, str(device), precision, name == "auto", check)


@functools.cache
def _make_backend(name: str, device: str, precision: str, fallback: bool = False,
                  check: bool = True) -> Backend:
    if name == "reference":
        return ReferenceBackend()
    return OptimizedBackend(name, torch.device(device), precision, fallback, check)


class OptimizedBackend:
    """A non-reference backend (``compiled``, ``tensorrt``): the adaptive method runs through
    its module's compiled engine (``engine_for``); the direct and iterative methods run the
    reference (they are not the hot path).

    The first batch of each DAE is checked against the reference on its first
    ``FIRST_BATCH_IMAGES`` images (``check``); beyond ``apudae-engine verify``'s tolerance the
    backend logs one warning and runs the reference from then on. ``fallback`` (``auto``'s
    choice) also falls back when the engine fails to build.
    """

    def __init__(self, name: str, device: torch.device, precision: str,
                 fallback: bool = False, check: bool = True) -> None:
        self.name, self.device, self.precision = name, device, precision
        self.dtype = PRECISIONS[precision]
        self.fallback = fallback  # chosen by auto: if compiling fails, run the reference
        self.check = check
        self.failed: str | None = None
        self.first_batch: dict | None = None  # the first-batch check's record
        self._gated: weakref.WeakSet = weakref.WeakSet()  # DAEs that passed the parity check
        self._checked: weakref.WeakSet = weakref.WeakSet()  # DAEs whose first batch was checked

    def report(self) -> dict:
        """What ran: this backend, or the reference with the reason it fell back to it, and
        the first-batch check (``first_batch_check``, None before a checked batch)."""
        out = {"backend": self.name, "precision": self.precision, "fallback": None}
        if self.failed:
            out = {"backend": "reference", "precision": "fp32", "fallback": self.failed}
        return {**out, "first_batch_check": self.first_batch}

    def purify(self, dae, x, mu, sigma, config, image_ids=None) -> PurifyResult:
        # fp32 is IEEE float32 on GPUs too (see ieee_fp32_convolutions); this also holds for
        # the fp32 side of the parity check and for the convolutions chosen at graph capture.
        with ieee_fp32_convolutions(self.device):
            return self._purify(dae, x, mu, sigma, config, image_ids)

    def _purify(self, dae, x, mu, sigma, config, image_ids=None) -> PurifyResult:
        reference = ReferenceBackend()
        if self.failed:
            return reference.purify(dae, x, mu, sigma, config, image_ids)
        if config.method != "adaptive":
            _log_once(("method", config.method, self.name), logging.INFO,
                      "the %s backend optimises the adaptive method; %s runs the reference",
                      self.name, config.method)
            return reference.purify(dae, x, mu, sigma, config, image_ids)
        config.require_seed()
        mu, sigma = calibration(config, mu, sigma)
        if x.device.type != self.device.type or (self.device.index is not None
                                                  and x.device.index != self.device.index):
            raise ValueError(f"images are on {x.device} but the backend runs on {self.device}")
        image_ids = checked_image_ids(x, image_ids)
        if x.shape[0] == 0:
            empty = torch.zeros(0, device=x.device)
            return PurifyResult(x.clone(), empty, empty.long())
        if self.dtype != torch.float32 and dae not in self._gated:
            check_precision_parity(dae, x[:64], self.dtype)
            self._gated.add(dae)
        xin, ids = x.float(), image_ids
        if x.shape[0] == 1:  # batch of one: pad, so compiled graphs never specialise on size 1
            xin, ids = xin.repeat(2, 1, 1, 1), ids.repeat(2)
        try:
            res = self._engine(dae).purify(xin.contiguous(), ids, mu, sigma, config)
        except Exception as exc:
            if not self.fallback or isinstance(exc, UserError):
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            self._fall_back(f"{self.name} failed on this machine ({first})")
            return reference.purify(dae, x, mu, sigma, config, image_ids)
        n = x.shape[0]
        res = PurifyResult(res.images[:n].to(x.dtype), res.error_before[:n],
                           res.active_steps[:n],
                           None if res.error_after is None else res.error_after[:n])
        if self.check and dae not in self._checked:
            self._checked.add(dae)
            k = min(n, FIRST_BATCH_IMAGES)
            ref = reference.purify(dae, x[:k], mu, sigma, config, image_ids[:k])
            got = PurifyResult(res.images[:k], res.error_before[:k], res.active_steps[:k])
            self.first_batch = first_batch_check(ref, got, self.precision)
            if self.first_batch["failures"]:
                self._fall_back(f"its first batch differs from the reference beyond tolerance "
                                f"({'; '.join(self.first_batch['failures'])})")
                return reference.purify(dae, x, mu, sigma, config, image_ids)
            log.info("%s matches the reference on the first %d images (max pixel difference "
                     "%.2g)", self.name, k, self.first_batch["max_abs_diff"])
        return res

    def _engine(self, dae: nn.Module):
        return _module(self.name).engine_for(dae, self.device, self.dtype)

    def _fall_back(self, reason: str) -> None:
        self.failed = reason
        log.warning("backend %s: %s; using the reference from now on", self.name, reason)
