"""The ``compiled`` backend: torch.compile of the step graph and of the fused update.

One adaptive step is ``r, dr/dy = StepGraph(x + delta)`` followed by noise, hinge weight and
Adam (``apudae_kernels.reference.adaptive_update_keyed``, the kernels' spec, compiled as is;
nothing of the maths is restated here). Here both halves are compiled:

- CPU: the forward (r and the saved pre-activations) and the input gradient are two compiled
  graphs, so the gradient is taken only for images whose hinge is active (r > mu). The
  others' gradient is multiplied by an exact zero in the reference, so skipping it changes
  nothing, and on clean data most images are inactive. The update is a third compiled graph
  (one fused loop: counter-based noise, hinge, Adam). Feature maps are channels-last.
- CUDA: the whole step graph is compiled, the update is the fused Triton kernel
  ``apudae_kernels.adaptive_update.adaptive_update_triton``, and the fixed-shape loop of
  ``steps`` iterations is captured once per batch shape as one CUDA graph and replayed.

Both run the one loop (``apudae_engine.method.loop.run_loop``) with their own step and update.
The noise is the reference's counter-based hash keyed by (seed, image id, step), with the step
as an int64 tensor, so every step reuses one compiled graph and the result equals the
reference to float tolerance with the noise on.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from apudae_engine.backends.step_graph import StepGraph
from apudae_engine.method.config import PurifyConfig
from apudae_engine.method.loop import LoopState, PurifyResult, Update, run_loop
from apudae_kernels.reference import adam_scalars, adaptive_update_keyed, image_keys, step_keys

log = logging.getLogger(__name__)
_CUDA_LOOPS_KEPT = 4  # captured CUDA graphs kept per DAE (one per batch shape)


@dataclass(frozen=True)
class UpdateConstants:
    """The per-run constants of the adaptive update (everything but the step)."""

    mu: float
    sigma: float
    eps_n: float
    max_scale: float
    beta1: float
    beta2: float
    eps: float
    noise: bool


def _cxx_compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("clang++")


def cpu_bf16_supported() -> bool:
    """Whether oneDNN runs bfloat16 convolutions natively here (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def unavailable_reason(device: torch.device, precision: str) -> str | None:
    """None when the compiled backend runs on ``device`` in ``precision``, else why not and
    the fix, as one sentence."""
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


def adaptive_update(x, delta, m, v, r, grad_r, keys, step, step_size, bias2_sqrt,
                    c: UpdateConstants):
    """``adaptive_update_ref`` on (N, C, H, W) tensors with the step-dependent scalars as
    tensors: ``step`` (int64), ``step_size`` = lr / (1 - beta1**t) and ``bias2_sqrt`` =
    sqrt(1 - beta2**t) (float32, rounded from float64 like the reference's Python floats)."""
    return adaptive_update_keyed(x, delta, grad_r, m, v, r, step_keys(keys, step), step_size,
                                 bias2_sqrt, c.mu, c.sigma, c.eps_n, c.max_scale, c.beta1,
                                 c.beta2, c.eps, c.noise)


def step_scalars(config: PurifyConfig, device: torch.device) -> list[tuple[torch.Tensor, ...]]:
    """(step, step_size, bias2_sqrt) tensors for t = 1..steps."""
    out = []
    for t in range(1, config.steps + 1):
        step_size, bias2_sqrt = adam_scalars(t, config.lr, config.beta1, config.beta2)
        out.append((torch.tensor(t, dtype=torch.int64, device=device),
                    torch.tensor(step_size, dtype=torch.float32, device=device),
                    torch.tensor(bias2_sqrt, dtype=torch.float32, device=device)))
    return out


def constants(config: PurifyConfig, mu: float, sigma: float) -> UpdateConstants:
    return UpdateConstants(float(mu), float(sigma), config.noise_eps, config.noise_max_scale,
                           config.beta1, config.beta2, config.adam_eps, config.noise)


# The graphs' modules name the step graph ``step``: ``graph`` is a GraphModule's own attribute,
# and torch.export cannot unlift a submodule of that name.
class _Residual(nn.Module):
    def __init__(self, graph: StepGraph) -> None:
        super().__init__()
        self.step = graph

    def forward(self, y: torch.Tensor):
        return self.step.residual(y)


class _Gradient(nn.Module):
    def __init__(self, graph: StepGraph) -> None:
        super().__init__()
        self.step = graph

    def forward(self, e, go, pre, idx):
        return self.step.gradient(e[idx], go[idx], [p[idx] for p in pre])


class _Update(nn.Module):
    def __init__(self, c: UpdateConstants) -> None:
        super().__init__()
        self.c = c

    def forward(self, x, delta, m, v, r, grad, keys, step, step_size, bias2_sqrt):
        return adaptive_update(x, delta, m, v, r, grad, keys, step, step_size, bias2_sqrt,
                               self.c)


def _batch_dynamic(*tensors: torch.Tensor) -> None:
    for t in tensors:
        torch._dynamo.maybe_mark_dynamic(t, 0)


class CompiledCPU:
    """The compiled loop on the CPU for one DAE and precision (see the module doc).

    Its three graphs come from the on-disk package cache (``backends.loop_cache``: built once
    per machine, loaded in about a second) or, where that cannot be used, from
    ``torch.compile`` in this process. Both are built on the first batch, which gives the
    example shapes."""

    def __init__(self, dae: nn.Module, dtype: torch.dtype) -> None:
        graph = StepGraph(dae, dtype).eval()
        graph.net.channels_last = True
        self._modules = _Residual(graph), _Gradient(graph)
        self.residual = self.gradient = None
        self._updates: dict[UpdateConstants, object] = {}

    def _build(self, x: torch.Tensor) -> None:
        """Load (or build) the residual and gradient graphs for images shaped like ``x``."""
        from apudae_engine.backends import loop_cache

        residual, gradient = self._modules
        example = x[:1].expand(2, *x.shape[1:]).contiguous()
        r, e, go, pre = residual(example)
        idx = torch.arange(2)
        batch = torch.export.Dim("batch", min=2, max=loop_cache.MAX_BATCH)
        rows = torch.export.Dim("rows", min=2, max=loop_cache.MAX_BATCH)
        loaded = loop_cache.load_or_build("residual", residual, (example,),
                                          loop_cache.batch_dims((example,), batch))
        if loaded is not None:
            grad_dims = loop_cache.batch_dims((e, go, pre), batch) + ({0: rows},)
            loaded = loaded, loop_cache.load_or_build("gradient", gradient, (e, go, pre, idx),
                                                      grad_dims)
        if loaded is None or loaded[1] is None:  # both from one source: same strides
            loaded = torch.compile(residual), torch.compile(gradient)
        self.residual, self.gradient = loaded

    def _update(self, c: UpdateConstants, x: torch.Tensor):
        if c not in self._updates:
            from apudae_engine.backends import loop_cache

            n = 2
            # Distinct tensors: export would take one tensor passed twice for one input.
            shaped = [x[:1].expand(n, *x.shape[1:]).contiguous() for _ in range(5)]
            vec = torch.zeros(n, dtype=torch.float32)
            keys = torch.zeros(n, dtype=torch.int64)
            scalars = step_scalars(PurifyConfig(steps=1, seed=0), x.device)[0]
            example = (*shaped[:4], vec, shaped[4], keys, *scalars)
            module = _Update(c)
            self._updates[c] = (loop_cache.load_or_build(
                "update", module, example, loop_cache.batch_dims(example),
                extra={"constants": repr(c)}) or torch.compile(module))
        return self._updates[c]

    @torch.no_grad()
    def purify(self, x: torch.Tensor, ids: torch.Tensor, mu: float, sigma: float,
               config: PurifyConfig) -> PurifyResult:
        if self.residual is None:
            self._build(x)
        compiled = self._update(constants(config, mu, sigma), x)
        keys = image_keys(config.seed, ids)
        scalars = step_scalars(config, x.device)

        def step(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            _batch_dynamic(y)
            r, e, go, pre = self.residual(y)
            grad = torch.zeros_like(y)
            idx = (r > mu).nonzero().squeeze(1)
            if idx.numel():
                if idx.numel() == 1:  # a batch of one would recompile (size-1 specialisation)
                    idx = idx.repeat(2)
                _batch_dynamic(idx, e, go, *pre)
                grad.index_copy_(0, idx, self.gradient(e, go, pre, idx))
            return r, grad

        def update(t: int, s: LoopState, r: torch.Tensor, grad: torch.Tensor) -> LoopState:
            _batch_dynamic(s.x, s.delta, s.m, s.v, r, grad, keys)
            return LoopState(*compiled(s.x, s.delta, s.m, s.v, r, grad, keys, *scalars[t - 1]))

        res = run_loop(x.clone(), config.steps, mu, step, update, config.clip)
        _batch_dynamic(res.images)
        res.error_after = self.residual(res.images)[0]  # the folded graph: cheaper than eager
        return res


class FixedShapeLoop:
    """The whole ``steps``-iteration loop for one batch shape: ``step_fn`` (y -> r, dr/dy)
    and the fused Triton update, captured as one CUDA graph when ``capture`` (the default on
    CUDA). Uncaptured it also runs on the CPU under TRITON_INTERPRET=1 (tests)."""

    def __init__(self, step_fn, shape: torch.Size, device: torch.device, mu: float,
                 sigma: float, config: PurifyConfig, capture: bool | None = None) -> None:
        self.step_fn, self.mu, self.sigma, self.config = step_fn, mu, sigma, config
        self.x = torch.zeros(shape, device=device)
        self.ids = torch.zeros(shape[0], dtype=torch.int64, device=device)
        self.graph = None
        if capture if capture is not None else device.type == "cuda":
            self._capture(device)

    def _capture(self, device: torch.device) -> None:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up: compiles the graph and the Triton kernel
            self.loop()
        caller = torch.cuda.current_stream(device)
        caller.wait_stream(side)
        try:
            graph = torch.cuda.CUDAGraph()
            # thread_local, not the default global mode: the folder pipeline decodes the next
            # batch on another thread (cudaMalloc, copies, DALI/nvJPEG) while the first batch
            # of a shape is captured, and global mode fails those calls and the capture.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.outputs = self.loop()
            self.graph = graph
        except RuntimeError as exc:  # keep working, only slower
            log.warning("CUDA graph capture failed (%s); running the loop uncaptured",
                        str(exc).splitlines()[0])
        finally:
            # torch.cuda.graph leaves its capture stream current when capture_end raises;
            # later work must run on the caller's stream, ordered with the other threads'.
            torch.cuda.set_stream(caller)

    def loop(self) -> PurifyResult:
        update = triton_update(self.config, self.mu, self.sigma, self.ids)
        return run_loop(self.x.clone(), self.config.steps, self.mu, self.step_fn, update,
                        self.config.clip)

    def run(self, x: torch.Tensor, ids: torch.Tensor) -> PurifyResult:
        self.x.copy_(x)
        self.ids.copy_(ids)
        if self.graph is None:
            res = self.loop()
        else:
            self.graph.replay()
            res = self.outputs
        return PurifyResult(res.images.clone(), res.error_before.clone(),
                            res.active_steps.clone())


def triton_update(config: PurifyConfig, mu: float, sigma: float, ids: torch.Tensor) -> Update:
    """The loop's update as the fused Triton kernel (``adaptive_update_triton``, tested against
    ``adaptive_update_keyed``), in place on the loop's contiguous tensors."""
    from apudae_kernels.adaptive_update import adaptive_update_triton

    c = config

    def update(t: int, s: LoopState, r: torch.Tensor, grad: torch.Tensor) -> LoopState:
        return LoopState(*adaptive_update_triton(
            s.x, s.delta, grad, s.m, s.v, r, ids, c.seed, t, mu, sigma, c.noise_eps,
            c.noise_max_scale, c.lr, c.beta1, c.beta2, c.adam_eps, c.noise, inplace=True))

    return update


class CompiledCUDA:
    """The compiled loop on a GPU: compiled step graph, Triton update, CUDA graph replay."""

    def __init__(self, dae: nn.Module, dtype: torch.dtype, device: torch.device,
                 step_fn=None) -> None:
        if step_fn is None:
            graph = StepGraph(dae, dtype).eval().to(device)
            step_fn = torch.compile(graph)
        self.step_fn, self.device = step_fn, device
        self._loops: OrderedDict[tuple, FixedShapeLoop] = OrderedDict()

    @torch.no_grad()
    def purify(self, x: torch.Tensor, ids: torch.Tensor, mu: float, sigma: float,
               config: PurifyConfig) -> PurifyResult:
        # Batches are padded up to a power of two, so a run's last, partial batch (or a batch
        # short of its failed files) replays a captured loop instead of compiling and capturing
        # a new one. Each image's result depends only on itself, so padding changes nothing.
        n = x.shape[0]
        bucket = batch_bucket(n)
        if bucket > n:
            x = torch.cat([x, x[:1].expand(bucket - n, *x.shape[1:])])
            ids = torch.cat([ids, ids[:1].expand(bucket - n)])
        key = (tuple(x.shape), float(mu), float(sigma), config)
        loop = self._loops.pop(key, None)
        if loop is None:
            loop = FixedShapeLoop(self.step_fn, x.shape, self.device, mu, sigma, config)
        self._loops[key] = loop
        while len(self._loops) > _CUDA_LOOPS_KEPT:
            self._loops.popitem(last=False)
        res = loop.run(x, ids)
        if bucket == n:
            return res
        return PurifyResult(res.images[:n], res.error_before[:n], res.active_steps[:n])


def batch_bucket(n: int) -> int:
    """The captured batch size that serves ``n`` images: the next power of two, at least 2."""
    return max(2, 1 << (n - 1).bit_length())


_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def engine_for(dae: nn.Module, device: torch.device, dtype: torch.dtype):
    """The compiled engine of ``dae`` (built once per DAE, device and dtype).

    The DAE's weights are copied (BatchNorm folded) when the engine is built; a DAE changed
    in place afterwards needs a new module object.
    """
    per_dae = _ENGINES.setdefault(dae, {})
    key = (str(device), dtype)
    if key not in per_dae:
        log.info("compiling the purification step for this DAE on %s (%s); the first batch "
                 "takes longer", device, str(dtype).removeprefix("torch."))
        if device.type == "cuda":
            per_dae[key] = CompiledCUDA(dae, dtype, device)
        else:
            per_dae[key] = CompiledCPU(dae, dtype)
    return per_dae[key]
