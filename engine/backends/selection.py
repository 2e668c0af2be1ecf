"""Which implementation runs the purification loop: the one module that decides.

Backends (``--backend``):

- ``reference``: eager PyTorch with autograd (``reference.py``), the specification.
- ``compiled``: ``torch.compile`` of the forward-only step graph and the fused update, on CPU
  (needs a C++ compiler) and CUDA (needs triton; CUDA graphs replay the loop).
- ``tensorrt``: a TensorRT engine of the exported step graph (CUDA, the ``tensorrt`` extra).
- ``auto``: the fastest usable one for the device (CUDA: compiled; CPU: compiled when a C++
  compiler exists, else reference), logged once.

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
from dataclasses import dataclass, field
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
_logged: set[tuple[str, str, str]] = set()


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
            return ("torch_tensorrt is not installed; pip install 'apudae-engine[tensorrt]' "
                    "or use --backend compiled")
        return None
    return f"unknown backend {name!r}; choose one of {', '.join(CHOICES)}"


def resolve_backend(name: str, device: str | torch.device = "cpu",
                    precision: str = "fp32") -> str:
    """The concrete backend for ``name`` (``auto`` resolved); raises BackendUnavailable."""
    device = torch.device(device)
    if name == "auto":
        order = ("compiled", "reference")
        choice = next(b for b in order if unavailable_reason(b, device, precision) is None
                      or b == "reference")
        if choice == "reference" and precision != "fp32":
            raise BackendUnavailable(f"no backend runs precision {precision} on {device}: "
                                     f"{unavailable_reason('compiled', device, precision)}")
        key = (str(device), precision, choice)
        if key not in _logged:
            _logged.add(key)
            skipped = unavailable_reason("compiled", device, precision)
            log.info("backend auto -> %s on %s (%s)%s", choice, device, precision,
                     f"; compiled unavailable: {skipped}" if skipped else "")
        return choice
    reason = unavailable_reason(name, device, precision)
    if reason is not None:
        raise BackendUnavailable(f"backend {name!r} cannot run here: {reason}")
    return name


def check_backend(name: str, device: str | torch.device = "cpu", precision: str = "fp32") -> str:
    """Validate a user's ``--backend`` choice before any work starts (see resolve_backend)."""
    return resolve_backend(name, device, precision)


def get_backend(name: str = "auto", device: str | torch.device = "cpu",
                precision: str = "fp32") -> Backend:
    """The backend object for ``name`` on ``device`` (cached; ``auto`` resolved here)."""
    device = torch.device(device)
    resolved = resolve_backend(name, device, precision)
    return _make_backend(resolved, str(device), precision, name == "auto")


@functools.cache
def _make_backend(name: str, device: str, precision: str, fallback: bool = False) -> Backend:
    if name == "reference":
        return ReferenceBackend()
    return OptimizedBackend(name, torch.device(device), precision, fallback)


class ReferenceBackend:
    """Eager autograd: ``reference.purify``."""

    name, precision = "reference", "fp32"

    def purify(self, dae, x, mu, sigma, config, image_ids=None) -> PurifyResult:
        with torch.no_grad(), ieee_fp32_convolutions(x.device):
            return purify(dae, x, config, mu, sigma, image_ids)


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


@dataclass
class SpotCheck:
    """``purify --verify-every N``: rerun the reference on every N-th batch and record the
    largest pixel difference; differences above ``tolerance`` are logged as warnings.

    Example (in the folder pipeline)::

        check = SpotCheck(every=job.verify_every)
        check(batch_index, purifier, x, ids, result)   # after purifier.purify(x, ids)
    """

    every: int = 0
    tolerance: float = 8.0 / 255  # see verify.TOLERANCES (fp32)
    records: list[dict] = field(default_factory=list)

    def __call__(self, batch_index: int, purifier, x: torch.Tensor, ids: torch.Tensor,
                 result: PurifyResult) -> dict | None:
        if self.every <= 0 or batch_index % self.every:
            return None
        with torch.no_grad():
            ref = purify(purifier.dae, x, purifier.config, purifier.mu, purifier.sigma, ids)
        diff = (ref.images - result.images).abs()
        rec = {"batch": batch_index, "images": int(x.shape[0]),
               "max_abs_diff": float(diff.max()) if diff.numel() else 0.0,
               "mean_abs_diff": float(diff.mean()) if diff.numel() else 0.0,
               "error_before_max_diff": float((ref.error_before - result.error_before).abs()
                                              .max()) if diff.numel() else 0.0}
        self.records.append(rec)
        level = logging.WARNING if rec["max_abs_diff"] > self.tolerance else logging.INFO
        log.log(level, "verify batch %d: max pixel diff %.2e (tolerance %.2e), mean %.2e",
                batch_index, rec["max_abs_diff"], self.tolerance, rec["mean_abs_diff"])
        return rec

    @property
    def worst(self) -> float:
        return max((r["max_abs_diff"] for r in self.records), default=0.0)
