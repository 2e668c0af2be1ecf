"""The ``tensorrt`` backend: a TensorRT engine of the exported step graph (CUDA only).

The step graph (``step_graph.StepGraph``) is exported with a dynamic batch dimension and
compiled by torch-tensorrt in the requested precision; the loop around it is the compiled
backend's (Triton update, CUDA graph replay). Built engines are cached on disk, keyed by the
model's hash, the GPU, the precision, the input shape, the batch range and the versions of
torch, torch-tensorrt and TensorRT: ``$APUDAE_TRT_CACHE`` or ``~/.cache/apudae-engine/tensorrt``.

torch_tensorrt is imported only here, when the backend is first used; install it with
the torch-tensorrt release built for the installed torch (an unmatched one replaces torch).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import weakref
from pathlib import Path

import torch
from torch import nn

from apudae_engine.backends.compiled import CompiledCUDA
from apudae_engine.backends.export import export_program, model_hash
from apudae_engine.core.errors import BackendUnavailable

log = logging.getLogger(__name__)
_MIN_PROFILE_BATCH = 512  # the engine's batch range is [1, max(512, next power of two >= N)]


def unavailable_reason(device: torch.device, precision: str) -> str | None:
    """None when the tensorrt backend can run on ``device``, else why not and the fix."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return "the tensorrt backend needs an NVIDIA GPU; use --device cuda on a GPU machine"
    if importlib.util.find_spec("torch_tensorrt") is None:
        return (f"torch_tensorrt is not installed; install the torch-tensorrt release built "
                f"for your torch {torch.__version__}, or use --backend compiled")
    return None


def cache_dir() -> Path:
    return Path(os.environ.get("APUDAE_TRT_CACHE",
                               Path.home() / ".cache" / "apudae-engine" / "tensorrt"))


def _import_trt():
    try:
        import torch_tensorrt
    except ImportError:
        raise BackendUnavailable(f"backend 'tensorrt' needs torch_tensorrt; install the "
                                 f"torch-tensorrt release built for your torch "
                                 f"{torch.__version__}, or use --backend compiled") from None
    return torch_tensorrt


def cache_key(dae: nn.Module, shape: tuple[int, int, int], dtype: torch.dtype,
              max_batch: int, device: torch.device) -> str:
    """The engine cache key: model hash, GPU, precision, shapes and library versions."""
    trt_mod = _import_trt()
    try:
        import tensorrt

        trt_version = tensorrt.__version__
    except ImportError:
        trt_version = None
    props = torch.cuda.get_device_properties(device)
    doc = {"model": model_hash(dae), "gpu": props.name,
           "capability": f"{props.major}.{props.minor}", "dtype": str(dtype),
           "shape": list(shape), "max_batch": max_batch, "torch": torch.__version__,
           "torch_tensorrt": trt_mod.__version__, "tensorrt": trt_version}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


def build_step(dae: nn.Module, shape: tuple[int, int, int], dtype: torch.dtype,
               max_batch: int, device: torch.device):
    """A callable y -> (r, dr/dy) running a TensorRT engine; loaded from the cache if built."""
    trt = _import_trt()
    path = cache_dir() / f"{cache_key(dae, shape, dtype, max_batch, device)}.ep"
    if path.is_file():
        log.info("loading the TensorRT engine from %s", path)
        return torch.export.load(str(path)).module()
    log.info("building a TensorRT engine (%s, batch 1..%d, %s); cached at %s",
             str(dtype).removeprefix("torch."), max_batch, "x".join(map(str, shape)), path)
    # The step graph computes in ``dtype`` itself (float32 in and out), so TensorRT's explicit
    # typing keeps each layer's precision as exported.
    program = export_program(dae, shape, max_batch, dtype=dtype, device=device)
    opt = min(max_batch, _MIN_PROFILE_BATCH)
    inputs = [trt.Input(min_shape=(1, *shape), opt_shape=(opt, *shape),
                        max_shape=(max_batch, *shape), dtype=torch.float32)]
    module = _with_inputs(trt.dynamo.compile, program, inputs,
                          **compile_options(trt.dynamo.compile, dtype), device=device,
                          min_block_size=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The Input ranges, not example tensors: saved with a plain tensor, the program would be
    # re-exported with that one batch size fixed, and a cached engine would take no other.
    _with_inputs(trt.save, module, inputs, file_path=str(path), output_format="exported_program")
    return module


def compile_options(compile_fn, dtype: torch.dtype) -> dict:
    """Precision options for ``torch_tensorrt.dynamo.compile`` of this version.

    Newer releases type the network explicitly from the graph (``use_explicit_typing``;
    ``enabled_precisions`` is deprecated there); older ones take ``enabled_precisions``. fp32
    disables TF32 in either, as the engine's fp32 is IEEE float32 everywhere.
    """
    import inspect

    params = inspect.signature(compile_fn).parameters
    if "use_explicit_typing" in params:
        options: dict = {"use_explicit_typing": True}
    else:
        options = {"enabled_precisions": {dtype}}
    if dtype == torch.float32 and "disable_tf32" in params:
        options["disable_tf32"] = True
    return options


def _with_inputs(fn, first, inputs, **kwargs):
    """Call a torch-tensorrt API with ``arg_inputs=`` (2.5+) or ``inputs=`` (older)."""
    try:
        return fn(first, arg_inputs=inputs, **kwargs)
    except TypeError as exc:
        if "arg_inputs" not in str(exc):
            raise
        return fn(first, inputs=inputs, **kwargs)


class TensorRTEngine:
    """Per-DAE engines (one per image shape) with the compiled backend's CUDA loop."""

    def __init__(self, dae: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
        self.dae, self.dtype, self.device = dae, dtype, device
        self._loops: dict[tuple, tuple[int, CompiledCUDA]] = {}

    def purify(self, x, ids, mu, sigma, config):
        shape = tuple(x.shape[1:])
        max_batch, loop = self._loops.get(shape, (0, None))
        if loop is None or x.shape[0] > max_batch:
            max_batch = max(_MIN_PROFILE_BATCH, 1 << (x.shape[0] - 1).bit_length())
            step = build_step(self.dae, shape, self.dtype, max_batch, self.device)
            loop = CompiledCUDA(self.dae, self.dtype, self.device, step_fn=step)
            self._loops[shape] = (max_batch, loop)
        return loop.purify(x, ids, mu, sigma, config)


_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def engine_for(dae: nn.Module, device: torch.device, dtype: torch.dtype) -> TensorRTEngine:
    per_dae = _ENGINES.setdefault(dae, {})
    key = (str(device), dtype)
    if key not in per_dae:
        per_dae[key] = TensorRTEngine(dae, dtype, device)
    return per_dae[key]
