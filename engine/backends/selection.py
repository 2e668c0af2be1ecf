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

Nothing is chosen or imported at import time. Reduced precision (``bf16``, ``fp16``) is opt-in
for the compiled and tensorrt backends and gated by a parity check against float32 on the
first batch; ``apudae-engine verify`` reports the end-to-end differences.

Example::

    backend = get_backend("auto", "cpu")
    result = backend.purify(dae, x, mu, sigma, PurifyConfig(), image_ids)
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import shutil
import weakref
from typing import Protocol

import torch
from torch import nn

from apudae_engine.core.errors import BackendUnavailable, UserError
from apudae_engine.core.numerics import ieee_fp32_convolutions
from apudae_engine.method.config import PurifyConfig
from apudae_engine.method.purification import PurifyResult, image_fingerprint, purify

log = logging.getLogger(__name__)

BACKENDS = ("reference", "compiled", "tensorrt")
CHOICES = ("auto", *BACKENDS)
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Reduced precision must keep the step close to float32 on the first batch (up to 64 images):
# the median relative error of r and the mean cosine similarity of dr/dy against the float32
# graph (typical bf16 values for the fmnist DAE: 0.3 % and 0.996).
PARITY = {"r_rel_err_median": 0.01, "grad_cosine_mean": 0.98}
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


def _cxx_compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("clang++")


def cpu_bf16_supported() -> bool:
    """Whether oneDNN runs bfloat16 convolutions natively here (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def unavailable_reason(name: str, device: str | torch.device = "cpu",
                       precision: str = "fp32") -> str | None:
    """None when backend ``name`` can run on ``device`` in ``precision``, else why not and
    the fix, as one sentence."""
    device = torch.device(device)
    if precision not in PRECISIONS:
        return f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}"
    if name == "reference":
        if precision != "fp32":
            return ("the reference backend is the float32 specification; use --precision fp32 "
                    "or --backend compiled")
        return None
    if name == "compiled":
        if device.type == "cpu":
            if _cxx_compiler() is None:
                return ("torch.compile on the CPU needs a C++ compiler and none is on PATH; "
                        "install g++ (apt-get install g++) or use --backend reference")
            if precision == "fp16":
                return "fp16 convolutions are not fast on the CPU; use --precision bf16 or fp32"
            if precision == "bf16" and not cpu_bf16_supported():
                return ("this CPU has no native bfloat16 convolutions (AVX512-BF16 or AMX); "
                        "use --precision fp32")
            return None
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return "no CUDA device is visible to PyTorch; use --device cpu"
            if importlib.util.find_spec("triton") is None:
                return ("the compiled backend on CUDA needs triton; "
                        "pip install 'apudae-engine[triton]'")
            return None
        return f"the compiled backend runs on cpu and cuda, not on {device.type}"
    if name == "tensorrt":
        if device.type != "cuda" or not torch.cuda.is_available():
            return "the tensorrt backend needs an NVIDIA GPU; use --device cuda on a GPU machine"
        if importlib.util.find_spec("torch_tensorrt") is None:
            return (f"torch_tensorrt is not installed; install the torch-tensorrt release "
                    f"built for your torch {torch.__version__}, or use --backend compiled")
        return None
    return f"unknown backend {name!r}; choose one of {', '.join(CHOICES)}"


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
                precision: str = "fp32", differentiable: bool = False) -> Backend:
    """The backend object for ``name`` on ``device`` (cached; ``auto`` resolved here).

    ``differentiable=True`` (attacks that take gradients through the loop) always gives the
    reference: it is the only path that keeps the loop on the autograd graph.
    """
    device = torch.device(device)
    if differentiable:
        return _make_backend("reference", str(device), "fp32")
    resolved = resolve_backend(name, device, precision)
    return _make_backend(resolved, str(device), precision, name == "auto")


@functools.cache
def _make_backend(name: str, device: str, precision: str, fallback: bool = False) -> Backend:
    if name == "reference":
        return ReferenceBackend()
    return OptimizedBackend(name, torch.device(device), precision, fallback)


class ReferenceBackend:
    """Eager PyTorch with autograd: ``method.purification.purify``, in IEEE float32."""

    name, precision = "reference", "fp32"

    def purify(self, dae, x, mu, sigma, config, image_ids=None,
               differentiable: bool = False) -> PurifyResult:
        with ieee_fp32_convolutions(x.device):
            if differentiable:
                return purify(dae, x, config, mu, sigma, image_ids, True)
            with torch.no_grad():
                return purify(dae, x, config, mu, sigma, image_ids)

    def report(self) -> dict:
        """What ran: ``{"backend", "precision", "fallback"}`` (see OptimizedBackend.report)."""
        return {"backend": self.name, "precision": self.precision, "fallback": None}


class OptimizedBackend:
    """``compiled`` or ``tensorrt``: the adaptive method runs through a compiled engine; the
    direct and iterative methods run the reference (they are not the hot path)."""

    def __init__(self, name: str, device: torch.device, precision: str,
                 fallback: bool = False) -> None:
        self.name, self.device, self.precision = name, device, precision
        self.dtype = PRECISIONS[precision]
        self.fallback = fallback  # chosen by auto: if compiling fails, run the reference
        self.failed: str | None = None
        self._gated: weakref.WeakSet = weakref.WeakSet()  # DAEs that passed the parity check

    def report(self) -> dict:
        """What ran: this backend, or the reference with the reason it fell back to it."""
        if self.failed:
            return {"backend": "reference", "precision": "fp32", "fallback": self.failed}
        return {"backend": self.name, "precision": self.precision, "fallback": None}

    def _engine(self, dae: nn.Module):
        if self.name == "tensorrt":
            from apudae_engine.backends.tensorrt import engine_for
        else:
            from apudae_engine.backends.compiled import engine_for
        return engine_for(dae, self.device, self.dtype)

    def purify(self, dae, x, mu, sigma, config, image_ids=None) -> PurifyResult:
        # fp32 is IEEE float32 on GPUs too (see ieee_fp32_convolutions); this also holds for
        # the fp32 side of the parity check and for the convolutions chosen at graph capture.
        with ieee_fp32_convolutions(self.device):
            return self._purify(dae, x, mu, sigma, config, image_ids)

    def _purify(self, dae, x, mu, sigma, config, image_ids=None) -> PurifyResult:
        if self.failed:
            return ReferenceBackend().purify(dae, x, mu, sigma, config, image_ids)
        if config.method != "adaptive":
            key = ("method", config.method, self.name)
            if key not in _logged:
                _logged.add(key)
                log.info("the %s backend optimises the adaptive method; %s runs the reference",
                         self.name, config.method)
            return ReferenceBackend().purify(dae, x, mu, sigma, config, image_ids)
        config.require_seed()
        if mu is None or sigma is None:
            raise UserError("adaptive purification needs calibration statistics mu and sigma; "
                            "run `apudae-engine calibrate` on the DAE checkpoint")
        if x.device.type != self.device.type or (self.device.index is not None
                                                  and x.device.index != self.device.index):
            raise ValueError(f"images are on {x.device} but the backend runs on {self.device}")
        sigma = config.sigma_override if config.sigma_override is not None else sigma
        if image_ids is None:
            image_ids = image_fingerprint(x)
        image_ids = image_ids.to(device=x.device, dtype=torch.int64)
        if image_ids.shape != (x.shape[0],):
            raise ValueError(f"image_ids must have shape ({x.shape[0]},), "
                             f"got {tuple(image_ids.shape)}")
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
            self.failed = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            log.warning("backend auto: %s failed on this machine (%s); using the reference",
                        self.name, self.failed)
            return ReferenceBackend().purify(dae, x, mu, sigma, config, image_ids)
        n = x.shape[0]
        return PurifyResult(res.images[:n].to(x.dtype), res.error_before[:n],
                            res.active_steps[:n])


@torch.no_grad()
def check_precision_parity(dae: nn.Module, probe: torch.Tensor, dtype: torch.dtype) -> dict:
    """Compare the step graph in ``dtype`` with float32 on ``probe`` images; raise UserError
    when r or the gradient direction is further off than ``PARITY`` allows."""
    from apudae_engine.backends.step_graph import StepGraph

    r32, g32 = StepGraph(dae, torch.float32).to(probe.device)(probe.float())
    r16, g16 = StepGraph(dae, dtype).to(probe.device)(probe.float())
    rel = (r16 - r32).abs() / r32.abs().clamp_min(1e-6)
    cos = torch.nn.functional.cosine_similarity(g16.flatten(1), g32.flatten(1), dim=1)
    stats = {"r_rel_err_median": float(rel.median()), "r_rel_err_max": float(rel.max()),
             "grad_cosine_mean": float(cos.mean()), "grad_cosine_min": float(cos.min())}
    name = str(dtype).removeprefix("torch.")
    summary = (f"median relative r error {stats['r_rel_err_median']:.2g} (max "
               f"{stats['r_rel_err_max']:.2g}), mean gradient cosine "
               f"{stats['grad_cosine_mean']:.4f} (min {stats['grad_cosine_min']:.3f})")
    if (stats["r_rel_err_median"] > PARITY["r_rel_err_median"]
            or stats["grad_cosine_mean"] < PARITY["grad_cosine_mean"]):
        raise UserError(f"{name} is not accurate enough for this DAE against float32 on the "
                        f"first batch ({summary}); use --precision fp32")
    log.info("%s parity on the first batch: %s", name, summary)
    return stats
