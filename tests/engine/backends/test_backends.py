"""Backend selection, errors, and the compiled backend against the reference (noise on)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import apudae_engine.backends.compiled as compiled_module
import apudae_engine.backends.selection as backends
from apudae_engine.backends.compiled import adaptive_update, constants, step_scalars
from apudae_engine.backends.parity import FIRST_BATCH_IMAGES
from apudae_engine.backends.selection import (
    get_backend,
    resolve_backend,
    unavailable_reason,
)
from apudae_engine.backends.spot_check import SpotCheck
from apudae_engine.cli import main
from apudae_engine.core.errors import BackendUnavailable
from apudae_engine.core.numerics import ieee_fp32_convolutions
from apudae_engine.method.config import PurifyConfig
from apudae_engine.method.models import REDNet
from apudae_engine.method.purification import adaptive_purify, reconstruction_error
from apudae_kernels.reference import (
    adaptive_update_ref,
    image_keys,
    noise_from_keys,
    step_keys,
    uniform_noise_ref,
)

# -- the update in torch ops equals the kernels' reference --------------------------------------


@pytest.mark.parametrize("seed", [0, 7, 2**32 - 1])
def test_step_noise_is_the_reference_noise_bit_for_bit(seed):
    ids = torch.tensor([0, 1, 12345, 2**40 + 3, -5])
    keys = image_keys(seed, ids)
    for step in (1, 2, 13):
        got = noise_from_keys(step_keys(keys, torch.tensor(step)), 150)
        assert torch.equal(got, uniform_noise_ref(seed, ids, step, 150))


def test_adaptive_update_equals_the_reference():
    torch.manual_seed(0)
    n, shape = 4, (1, 5, 6)
    x, delta, grad = torch.rand(n, *shape), 0.01 * torch.randn(n, *shape), torch.randn(n, *shape)
    m, v = 0.1 * torch.randn(n, *shape), 0.01 * torch.rand(n, *shape)
    r, ids = torch.tensor([0.5, 2.0, 3.0, 9.0]), torch.arange(n)
    config = PurifyConfig(seed=3)
    c = constants(config, mu=2.5, sigma=1.2)
    for t, (step, step_size, bias2_sqrt) in enumerate(step_scalars(config, x.device), 1):
        got = adaptive_update(x, delta, m, v, r, grad, image_keys(3, ids), step, step_size,
                              bias2_sqrt, c)
        want = adaptive_update_ref(x.flatten(1), delta.flatten(1), grad.flatten(1), m.flatten(1),
                                   v.flatten(1), r, ids, 3, t, 2.5, 1.2, config.noise_eps,
                                   config.noise_max_scale, config.lr, config.beta1,
                                   config.beta2, config.adam_eps)
        for a, b in zip(got, want):
            torch.testing.assert_close(a.flatten(1), b, rtol=1e-6, atol=1e-7)


# -- selection and error messages ---------------------------------------------------------------


def test_reference_is_always_available():
    assert unavailable_reason("reference", "cpu") is None
    assert isinstance(get_backend("reference", "cpu"), backends.ReferenceBackend)


def test_auto_falls_back_to_reference_without_a_compiler_and_logs_once(monkeypatch, caplog):
    monkeypatch.setattr(compiled_module, "_cxx_compiler", lambda: None)
    monkeypatch.setattr(backends, "_logged", set())
    with caplog.at_level(logging.INFO, logger="apudae_engine.backends.selection"):
        assert resolve_backend("auto", "cpu") == "reference"
        assert resolve_backend("auto", "cpu") == "reference"
    lines = [r.message for r in caplog.records if "backend auto" in r.message]
    assert len(lines) == 1 and "C++ compiler" in lines[0]


def test_auto_prefers_compiled_when_a_compiler_exists(monkeypatch):
    monkeypatch.setattr(compiled_module, "_cxx_compiler", lambda: "/usr/bin/g++")
    assert resolve_backend("auto", "cpu") == "compiled"


def test_explicit_compiled_without_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(compiled_module, "_cxx_compiler", lambda: None)
    with pytest.raises(BackendUnavailable, match="g\\+\\+.*--backend reference"):
        resolve_backend("compiled", "cpu")


@pytest.mark.parametrize(("name", "device", "precision", "message"), [
    ("tensorrt", "cpu", "fp32", "needs an NVIDIA GPU"),
    ("reference", "cpu", "bf16", "float32 specification"),
    ("compiled", "cpu", "fp16", "--precision bf16 or fp32"),
    ("warp", "cpu", "fp32", "unknown backend 'warp'"),
    ("compiled", "cpu", "fp8", "unknown precision"),
])
def test_unavailable_choices_raise_one_sentence(name, device, precision, message):
    with pytest.raises(BackendUnavailable, match=message) as info:
        resolve_backend(name, device, precision)
    assert "\n" not in str(info.value)


def test_tensorrt_missing_names_the_torch_to_match(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backends.importlib.util, "find_spec",
                        lambda name: None if name == "torch_tensorrt" else object())
    reason = unavailable_reason("tensorrt", "cuda")
    assert f"torch-tensorrt release built for your torch {torch.__version__}" in reason


def test_importing_the_module_chooses_and_imports_nothing_heavy():
    code = ("import sys, apudae_engine.backends.selection as b; "
            "print(b._make_backend.cache_info().currsize, sorted(m for m in sys.modules if m in "
            "('triton', 'torch_tensorrt', 'apudae_engine.backends.compiled', "
            "'apudae_engine.backends.tensorrt', 'onnxruntime')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
    assert out.split() == ["0", "[]"]


@pytest.mark.gpu
def test_tensorrt_backend_matches_reference_on_gpu():
    pytest.importorskip("torch_tensorrt", reason="install the 'tensorrt' extra")
    torch.manual_seed(0)
    dae = REDNet(1, layers=2, width=8).eval().cuda()
    x = torch.rand(4, 1, 16, 16, device="cuda")
    r = reconstruction_error(dae, x)
    mu, sigma = float(r.median()) + 1e-3, float(r.std())
    got = get_backend("tensorrt", "cuda").purify(dae, x, mu, sigma, PurifyConfig(seed=0))
    want = get_backend("reference", "cuda").purify(dae, x, mu, sigma, PurifyConfig(seed=0))
    assert (got.images - want.images).abs().max() < 4 / 255


@pytest.mark.gpu
def test_compiled_backend_matches_reference_on_gpu():
    torch.manual_seed(0)
    dae = REDNet(1, layers=2, width=8).eval().cuda()
    x = torch.rand(6, 1, 16, 16, device="cuda")
    r = reconstruction_error(dae, x)
    mu, sigma = float(r.median()) + 1e-3, float(r.std())
    backend = get_backend("compiled", "cuda")
    for _ in range(2):  # the second call replays the captured CUDA graph
        got = backend.purify(dae, x, mu, sigma, PurifyConfig(seed=0),
                             torch.arange(6, device="cuda"))
    with ieee_fp32_convolutions("cuda"):  # as the engine runs it; cuDNN defaults to TF32
        want = adaptive_purify(dae, x, mu, sigma, PurifyConfig(seed=0),
                               torch.arange(6, device="cuda"))
    torch.testing.assert_close(got.error_before, want.error_before, rtol=1e-4, atol=1e-4)
    assert (got.images - want.images).abs().max() < 4 / 255


# -- the compiled backend on the CPU (compiled once for this module) ----------------------------

needs_compiler = pytest.mark.skipif(compiled_module._cxx_compiler() is None,
                                    reason="torch.compile on the CPU needs a C++ compiler")


@pytest.fixture(scope="module")
def case():
    """A tiny DAE, 24 candidate images and a mu that splits them into active and inactive."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    dae = REDNet(1, layers=2, width=8).eval()
    for p in dae.parameters():
        p.requires_grad_(False)
    x = torch.rand(24, 1, 12, 12)
    with torch.no_grad():
        r = reconstruction_error(dae, x)
    order = r.argsort()
    # mu between two images' errors (never equal to one: r > mu must not be a rounding tie)
    mu = float(0.5 * (r[order[11]] + r[order[12]]))
    return {"dae": dae, "x": x, "mu": mu, "sigma": float(r.std()), "order": order}


def _both(case, x, ids, config=None):
    config = config or PurifyConfig(seed=0)
    got = get_backend("compiled", "cpu").purify(case["dae"], x, case["mu"], case["sigma"],
                                                config, ids)
    with torch.no_grad():
        want = adaptive_purify(case["dae"], x, case["mu"], case["sigma"], config, ids)
    return got, want


def _assert_close(got, want):
    torch.testing.assert_close(got.images, want.images, rtol=0, atol=1e-4)
    torch.testing.assert_close(got.error_before, want.error_before, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.active_steps, want.active_steps)


@pytest.mark.slow
@needs_compiler
def test_compiled_equals_reference_with_noise_on(case):
    x, ids = case["x"][case["order"][6:18]], torch.arange(100, 112)  # active and inactive
    got, want = _both(case, x, ids)
    assert 0 < int((want.active_steps > 0).sum()) < len(x)
    _assert_close(got, want)


@pytest.mark.slow
@needs_compiler
def test_compiled_handles_one_image_and_a_batch_without_active_images(case):
    low = case["x"][case["order"][:3]]  # errors far below mu: the gradient pass is skipped
    got, want = _both(case, low, torch.arange(3))
    assert int(want.active_steps.sum()) == 0
    _assert_close(got, want)
    one = case["x"][case["order"][-1:]]
    _assert_close(*_both(case, one, torch.tensor([5])))


@pytest.mark.slow
@needs_compiler
@settings(max_examples=5, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(0, 23), min_size=2, max_size=9, unique=True))
def test_compiled_purification_is_independent_of_the_batch(case, rows):
    """An image's result does not depend on which other images share its batch."""
    idx = torch.tensor(rows)
    ids = 1000 + idx
    backend = get_backend("compiled", "cpu")
    together = backend.purify(case["dae"], case["x"][idx], case["mu"], case["sigma"],
                              PurifyConfig(seed=0), ids)
    alone = backend.purify(case["dae"], case["x"][idx[:1]], case["mu"], case["sigma"],
                           PurifyConfig(seed=0), ids[:1])
    torch.testing.assert_close(together.images[:1], alone.images, rtol=0, atol=1e-5)


@pytest.mark.slow
@needs_compiler
def test_verify_backend_reports_parity(case):
    from apudae_engine.perf.verify import verify_backend

    rep = verify_backend(case["dae"], case["x"][:8], case["mu"], case["sigma"],
                         PurifyConfig(seed=0),
                         "compiled", batch_size=4)
    assert rep.passed, rep.failures
    assert rep.max_abs_diff < 1e-4 and rep.images == 8


@needs_compiler
def test_other_methods_run_the_reference(case):
    config = PurifyConfig(seed=0, method="iterative", steps=2)
    got = get_backend("compiled", "cpu").purify(case["dae"], case["x"][:2], None, None, config)
    with torch.no_grad():
        want = get_backend("reference", "cpu").purify(case["dae"], case["x"][:2], None, None,
                                                      config)
    assert torch.equal(got.images, want.images)


# -- verify --every and the CLI -----------------------------------------------------------------


def test_spot_check_runs_every_nth_batch(tiny_model, caplog):
    import dataclasses

    from apudae_engine.backends.purifier import Purifier

    purifier = Purifier.from_pretrained(tiny_model)
    x = torch.rand(3, 1, 28, 28)
    ids = torch.arange(3)
    result = purifier.purify(x, ids)
    check = SpotCheck(every=2)
    assert check(1, purifier, x, ids, result) is None
    rec = check(2, purifier, x, ids, result)
    assert rec["max_abs_diff"] == 0.0 and rec["images"] == 3
    assert check.worst == 0.0 and len(check.records) == 1
    # A backend that strays from the reference is measured and warned about.
    wrong = dataclasses.replace(result, images=result.images.clone())
    wrong.images[1, 0, 5, 7] += 0.25
    with caplog.at_level(logging.WARNING, logger="apudae_engine.backends.spot_check"):
        rec = check(4, purifier, x, ids, wrong)
    assert rec["max_abs_diff"] == pytest.approx(0.25, abs=1e-6)
    assert check.worst == rec["max_abs_diff"] and len(check.records) == 2
    assert "verify batch 4: max pixel diff 2.50e-01" in caplog.text


def test_verify_command_passes_and_fails_on_tolerance(tiny_model, tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray((torch.rand(28, 28) * 255).byte().numpy(), "L").save(folder / f"{i}.png")
    args = ["verify", "--model", str(tiny_model), "--input", str(folder), "--backend",
            "reference", "--steps", "2"]
    assert main(args + ["--json", str(tmp_path / "v.json")]) == 0
    out = capsys.readouterr().out
    assert "max pixel diff" in out and "label agreement" in out
    assert json.loads((tmp_path / "v.json").read_text())["passed"] is True
    assert main(args + ["--max-diff", "-1"]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_verify_fails_a_backend_that_strays_from_the_reference(case, monkeypatch):
    """verify's numbers are measured: one pixel off by 0.5 in one batch fails it."""
    from apudae_engine.perf.verify import verify_backend

    real = backends.get_backend

    class Straying:
        def purify(self, *args):
            result = real("reference", "cpu").purify(*args)
            if int(args[-1][0]) == 0:  # the first of two batches
                result.images[1, 0, 3, 4] += 0.5
            return result

    monkeypatch.setattr(compiled_module, "_cxx_compiler", lambda: "/usr/bin/g++")
    import apudae_engine.backends.purifier as purifier_module  # verify purifies through it

    monkeypatch.setattr(purifier_module, "get_backend",
                        lambda name, *a, **k: Straying() if name == "compiled" else real(name, *a))
    rep = verify_backend(case["dae"], case["x"][:8], case["mu"], case["sigma"],
                         PurifyConfig(seed=0),
                         "compiled", batch_size=4)
    assert rep.max_abs_diff == pytest.approx(0.5, abs=1e-6)
    assert rep.mean_abs_diff == pytest.approx(0.5 / (8 * 144), rel=1e-4)
    assert rep.frac_over_1_255 == 1 / (8 * 144)
    assert not rep.passed and [f.split()[0] for f in rep.failures] == ["max_abs_diff",
                                                                       "mean_abs_diff"]


def test_verify_command_unavailable_backend_is_one_line(tiny_model, capsys):
    rc = main(["verify", "--model", str(tiny_model), "--backend", "tensorrt", "--device", "cpu"])
    assert rc == 2
    assert "needs an NVIDIA GPU" in capsys.readouterr().err


def test_bench_command_writes_a_record(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["bench", "--cases", "rednet30-32", "--batch", "2", "--backends", "reference",
               "--repeats", "1", "--steps", "1", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    row = doc["results"][0]
    assert row["backend"] == "reference" and row["ratio_vs_reference"] == 1.0
    assert row["image"] == [3, 32, 32] and row["batch"] == 2 and row["gflops_effective"] > 0
    hw = doc["hardware"]
    assert hw["cpu"] and hw["cpu_cores"] and hw["torch"] == torch.__version__
    assert doc["peak"]["float32"]["peak_gflops"] > 0
    assert "img/s" in capsys.readouterr().out


def test_auto_falls_back_to_the_reference_when_compiling_fails(case, monkeypatch, caplog):
    import apudae_engine.backends.compiled as compiled_backend

    def broken(*args, **kwargs):
        raise RuntimeError("C++ compile error: Python.h not found")

    monkeypatch.setattr(compiled_backend, "engine_for", broken)
    monkeypatch.setattr(compiled_module, "_cxx_compiler", lambda: "/usr/bin/g++")
    backend = backends.OptimizedBackend("compiled", torch.device("cpu"), "fp32", fallback=True)
    x = case["x"][:2]
    with caplog.at_level(logging.WARNING, logger="apudae_engine.backends.selection"):
        got = backend.purify(case["dae"], x, case["mu"], case["sigma"], PurifyConfig(seed=0))
    assert "Python.h not found" in caplog.text
    want = get_backend("reference").purify(case["dae"], x, case["mu"], case["sigma"],
                                           PurifyConfig(seed=0))
    assert torch.equal(got.images, want.images)
    explicit = backends.OptimizedBackend("compiled", torch.device("cpu"), "fp32")
    with pytest.raises(RuntimeError, match="Python.h"):
        explicit.purify(case["dae"], x, case["mu"], case["sigma"], PurifyConfig(seed=0))


@pytest.mark.slow
def test_partial_batches_replay_the_loop_of_their_power_of_two(case):
    """The CUDA engine pads a batch to the next power of two: 5, 7 and 8 images share one
    loop (on a GPU, one capture), and each result is the unpadded reference's."""
    pytest.importorskip("triton", reason="install the 'triton' extra")
    from apudae_engine.backends.compiled import CompiledCUDA, batch_bucket
    from apudae_engine.backends.step_graph import StepGraph

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors need the Triton interpreter (set only without a GPU)")
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 8, 9, 512, 513)] == [2, 2, 4, 8, 8, 16, 512,
                                                                         1024]
    config = PurifyConfig(steps=3, seed=4)
    engine = CompiledCUDA(case["dae"], torch.float32, torch.device("cpu"),
                          step_fn=StepGraph(case["dae"]).eval())
    for n, start in ((5, 0), (7, 5), (8, 12)):
        x, ids = case["x"][case["order"][start:start + n]], torch.arange(start, start + n)
        got = engine.purify(x, ids, case["mu"], case["sigma"], config)
        assert got.images.shape == x.shape
        with torch.no_grad():
            want = adaptive_purify(case["dae"], x, case["mu"], case["sigma"], config, ids)
        _assert_close(got, want)
    assert [key[0][0] for key in engine._loops] == [8]


@pytest.mark.slow
def test_fixed_shape_loop_with_the_triton_update_matches_reference(case):
    """The CUDA loop (step graph + fused Triton update), run uncaptured on the CPU through the
    Triton interpreter: same arguments and order as on a GPU."""
    pytest.importorskip("triton", reason="install the 'triton' extra")
    from apudae_engine.backends.compiled import FixedShapeLoop
    from apudae_engine.backends.step_graph import StepGraph

    if os.environ.get("TRITON_INTERPRET") != "1":  # with a GPU, test_gpu.py covers CUDA
        pytest.skip("CPU tensors need the Triton interpreter (set only without a GPU)")
    x, ids = case["x"][case["order"][8:14]], torch.arange(6)
    config = PurifyConfig(steps=4, seed=9)
    loop = FixedShapeLoop(StepGraph(case["dae"]).eval(), x.shape, x.device, case["mu"],
                          case["sigma"], config, capture=False)
    got = loop.run(x, ids)
    with torch.no_grad():
        want = adaptive_purify(case["dae"], x, case["mu"], case["sigma"], config, ids)
    _assert_close(got, want)



class _FakeCudaGraphs:
    """torch.cuda's streams and graph capture, faked on the CPU: records the capture mode and
    which stream is current, and fails capture_end like CUDA when ``fail`` is set."""

    def __init__(self, monkeypatch):
        self.modes, self.fail = [], False
        self.caller = self.current = self._stream("caller")
        fake = self

        class graph:
            def __init__(self, cuda_graph, pool=None, stream=None, capture_error_mode="global"):
                fake.modes.append(capture_error_mode)

            def __enter__(self):
                self.previous, fake.current = fake.current, fake._stream("capture")

            def __exit__(self, *exc):
                if fake.fail:  # as torch.cuda.graph: capture_end raises, the stream stays
                    raise RuntimeError("CUDA error: operation not permitted when stream is "
                                       "capturing")
                fake.current = self.previous

        @contextlib.contextmanager
        def stream(s):
            previous, self.current = self.current, s
            yield
            self.current = previous

        monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: self._stream("side"))
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: self.current)
        monkeypatch.setattr(torch.cuda, "set_stream", lambda s: setattr(self, "current", s))
        monkeypatch.setattr(torch.cuda, "stream", stream)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
        monkeypatch.setattr(torch.cuda, "graph", graph)

    @staticmethod
    def _stream(name):
        return type("Stream", (), {"name": name, "wait_stream": lambda self, other: None})()

    def loop(self):
        from apudae_engine.backends.compiled import FixedShapeLoop

        def step(y):
            return y.flatten(1).sum(1), torch.ones_like(y)

        return FixedShapeLoop(step, torch.Size((2, 1, 4, 4)), torch.device("cpu"), 1.0, 1.0,
                              PurifyConfig(seed=0, steps=2), capture=True)


@pytest.fixture()
def fake_cuda_graphs(monkeypatch):
    pytest.importorskip("triton", reason="install the 'triton' extra")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors need the Triton interpreter (set only without a GPU)")
    return _FakeCudaGraphs(monkeypatch)


def test_cuda_graph_capture_leaves_other_threads_free(fake_cuda_graphs):
    """A new batch shape is captured while the pipeline's loader thread decodes the next batch
    on the same GPU (allocations, copies, DALI/nvJPEG calls). CUDA's default global capture
    mode fails such calls from any thread, and the capture with them; thread_local does not."""
    loop = fake_cuda_graphs.loop()
    assert loop.graph is not None
    assert fake_cuda_graphs.modes == ["thread_local"]
    assert fake_cuda_graphs.current is fake_cuda_graphs.caller


def test_failed_cuda_graph_capture_runs_uncaptured_on_the_callers_stream(fake_cuda_graphs):
    """After a failed capture the loop runs uncaptured, and on the stream it was called on:
    left on the capture stream it would read the loader's images unordered."""
    fake_cuda_graphs.fail = True
    loop = fake_cuda_graphs.loop()
    assert loop.graph is None
    assert fake_cuda_graphs.current is fake_cuda_graphs.caller
    x = torch.full((2, 1, 4, 4), 0.5)
    res = loop.run(x, torch.tensor([3, 4]))
    assert res.images.shape == x.shape and res.active_steps.tolist() == [2, 2]


def test_fp32_means_ieee_convolutions_on_gpus():
    """cuDNN's default TF32 convolutions drift over the Adam loop (see
    ieee_fp32_convolutions); the engine's backends run fp32 as IEEE float32 and restore the
    user's setting afterwards. The flag is plain state, so this runs without a GPU."""
    from apudae_engine.core.numerics import conv_fp32_precision

    conv = torch.backends.cudnn.conv
    before = conv.fp32_precision
    with ieee_fp32_convolutions("cpu"):
        assert conv.fp32_precision == before
    seen = []
    backend = backends.OptimizedBackend("compiled", torch.device("cuda"), "fp32")
    backend._purify = lambda *args: seen.append(conv_fp32_precision())
    try:
        conv.fp32_precision = "tf32"
        backend.purify(None, None, 1.0, 1.0, PurifyConfig(seed=0))
        assert seen == ["ieee"] and conv.fp32_precision == "tf32"
    finally:
        conv.fp32_precision = before


# -- the first-batch check ----------------------------------------------------------------------


def _straying_engine(case, offset: float):
    """A compiled engine that returns the reference's result with one pixel moved by
    ``offset`` in every image."""

    class Engine:
        def purify(self, x, ids, mu, sigma, config):
            res = get_backend("reference").purify(case["dae"], x, mu, sigma, config, ids)
            res.images[:, 0, 3, 4] += offset
            return res

    return lambda dae, device, dtype: Engine()


def test_first_batch_beyond_tolerance_falls_back_to_the_reference(case, monkeypatch, caplog):
    monkeypatch.setattr(compiled_module, "_cxx_compiler", lambda: "/usr/bin/g++")
    monkeypatch.setattr(compiled_module, "engine_for", _straying_engine(case, 0.5))
    backend = backends.OptimizedBackend("compiled", torch.device("cpu"), "fp32")
    x, cfg = case["x"][:4], PurifyConfig(seed=0)
    want = get_backend("reference").purify(case["dae"], x, case["mu"], case["sigma"], cfg)
    with caplog.at_level(logging.WARNING, logger="apudae_engine.backends.selection"):
        got = backend.purify(case["dae"], x, case["mu"], case["sigma"], cfg)
        again = backend.purify(case["dae"], x, case["mu"], case["sigma"], cfg)
    assert torch.equal(got.images, want.images) and torch.equal(again.images, want.images)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "first batch differs" in warnings[0].message
    report = backend.report()
    assert report["backend"] == "reference" and "max_abs_diff" in report["fallback"]
    check = report["first_batch_check"]
    assert check["images"] == 4 and check["max_abs_diff"] == pytest.approx(0.5, abs=1e-6)
    assert check["failures"] and check["failures"][0].startswith("max_abs_diff")


def test_first_batch_within_tolerance_keeps_the_backend_and_records_it(case, monkeypatch):
    monkeypatch.setattr(compiled_module, "_cxx_compiler", lambda: "/usr/bin/g++")
    monkeypatch.setattr(compiled_module, "engine_for", _straying_engine(case, 1e-7))
    backend = backends.OptimizedBackend("compiled", torch.device("cpu"), "fp32")
    x = case["x"][:FIRST_BATCH_IMAGES + 3]
    got = backend.purify(case["dae"], x, case["mu"], case["sigma"], PurifyConfig(seed=0))
    report = backend.report()
    assert report["backend"] == "compiled" and report["fallback"] is None
    check = report["first_batch_check"]
    assert check["images"] == FIRST_BATCH_IMAGES and not check["failures"]
    assert 0 < check["max_abs_diff"] < 1e-6
    assert got.images.shape == x.shape


def test_verify_does_not_let_the_backend_fall_back(case, monkeypatch):
    """verify compares the backend itself: the first-batch check must not swap in the
    reference it is compared with (the straying pixel stays visible)."""
    from apudae_engine.perf.verify import verify_backend

    monkeypatch.setattr(compiled_module, "_cxx_compiler", lambda: "/usr/bin/g++")
    monkeypatch.setattr(compiled_module, "engine_for", _straying_engine(case, 0.5))
    backends._make_backend.cache_clear()
    rep = verify_backend(case["dae"], case["x"][:4], case["mu"], case["sigma"],
                         PurifyConfig(seed=0), "compiled", batch_size=4)
    backends._make_backend.cache_clear()
    assert rep.max_abs_diff == pytest.approx(0.5, abs=1e-6) and not rep.passed


@needs_compiler
def test_compiled_cpu_reports_r_after_from_its_graph(case):
    """The compiled loop returns r of its purified images (its folded graph), which the
    folder runs record instead of rerunning the eager DAE: equal to r of those images."""
    backend = get_backend("compiled", "cpu", check=False)
    x = case["x"][:5]
    res = backend.purify(case["dae"], x, case["mu"], case["sigma"], PurifyConfig(seed=0))
    assert res.error_after is not None and res.error_after.shape == (5,)
    with torch.no_grad():
        want = reconstruction_error(case["dae"], res.images)
    torch.testing.assert_close(res.error_after, want, rtol=1e-4, atol=1e-5)
    ref = get_backend("reference").purify(case["dae"], x, case["mu"], case["sigma"],
                                          PurifyConfig(seed=0))
    assert ref.error_after is None  # the reference leaves it to the caller


def test_first_batch_check_fails_on_nan():
    """NaN compares false with every bound: the check must still fail it."""
    from apudae_engine.backends.parity import first_batch_check
    from apudae_engine.method.loop import PurifyResult

    ref = PurifyResult(torch.zeros(2, 1, 4, 4), torch.ones(2), torch.zeros(2, dtype=torch.int64))
    got = PurifyResult(torch.full((2, 1, 4, 4), float("nan")), torch.ones(2),
                       torch.zeros(2, dtype=torch.int64))
    check = first_batch_check(ref, got, "fp32")
    assert [f.split()[:2] for f in check["failures"]] == [["max_abs_diff", "nan"],
                                                          ["mean_abs_diff", "nan"]]
