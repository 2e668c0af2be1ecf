"""The compiled CPU loop's on-disk package cache: built once, loaded by a new engine, equal to
the loop compiled in-process, rebuilt when damaged, keyed by what changes the graphs."""

from __future__ import annotations

import logging

import pytest
import torch

from apudae_engine.backends import loop_cache
from apudae_engine.backends.compiled import CompiledCPU, _cxx_compiler
from apudae_engine.method.config import PurifyConfig
from apudae_engine.method.models import REDNet
from apudae_engine.method.purification import reconstruction_error

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(_cxx_compiler() is None, reason="needs a C++ compiler")]


@pytest.fixture(scope="module")
def case():
    torch.manual_seed(0)
    dae = REDNet(1, layers=2, width=8).eval()
    for p in dae.parameters():
        p.requires_grad_(False)
    x = torch.rand(6, 1, 12, 12)
    with torch.no_grad():
        r = reconstruction_error(dae, x)
    return {"dae": dae, "x": x, "mu": float(r.median()), "sigma": float(r.std())}


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("APUDAE_LOOP_CACHE", "1")
    monkeypatch.setenv("APUDAE_CACHE_DIR", str(tmp_path))
    return tmp_path / "cpu-loop"


def _purify(case, config=None):
    engine = CompiledCPU(case["dae"], torch.float32)
    config = config or PurifyConfig(seed=0)
    return engine, engine.purify(case["x"], torch.arange(6), case["mu"], case["sigma"], config)


def test_built_once_then_loaded_and_equal_to_the_in_process_loop(case, cache, caplog,
                                                                  monkeypatch):
    with caplog.at_level(logging.INFO, logger="apudae_engine.backends.loop_cache"):
        _, built = _purify(case)
    assert sorted(p.name.split("-")[0] for p in cache.glob("*.pt2")) == [
        "gradient", "residual", "update"]
    assert caplog.text.count("building the") == 3 and "could not" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="apudae_engine.backends.loop_cache"):
        engine, loaded = _purify(case)  # a new engine: loads, builds nothing
    assert "building" not in caplog.text
    assert not isinstance(engine.residual, torch.nn.Module)  # an AOTInductor package
    assert torch.equal(loaded.images, built.images)
    monkeypatch.setenv("APUDAE_LOOP_CACHE", "0")
    _, in_process = _purify(case)
    torch.testing.assert_close(loaded.images, in_process.images, rtol=0, atol=1e-5)
    torch.testing.assert_close(loaded.error_after, in_process.error_after, rtol=1e-5,
                               atol=1e-6)
    # (the in-process loop against the reference: test_backends.py)
    assert torch.equal(loaded.active_steps, in_process.active_steps)


def test_a_damaged_package_is_rebuilt(case, cache, caplog):
    _purify(case)
    residual = next(cache.glob("residual-*.pt2"))
    residual.write_bytes(b"not a package")
    with caplog.at_level(logging.INFO, logger="apudae_engine.backends.loop_cache"):
        _, res = _purify(case)
    assert caplog.text.count("building the residual") == 1
    assert residual.stat().st_size > 1000 and torch.isfinite(res.images).all()


def test_the_key_follows_weights_constants_and_shape(case):
    from apudae_engine.backends.compiled import _Residual
    from apudae_engine.backends.step_graph import StepGraph

    graph = _Residual(StepGraph(case["dae"], torch.float32).eval())
    y = torch.rand(2, 1, 12, 12)
    k = loop_cache.key("residual", graph, (y,))
    assert loop_cache.key("residual", graph, (torch.rand(5, 1, 12, 12),)) == k  # batch: no
    assert loop_cache.key("residual", graph, (torch.rand(2, 1, 16, 16),)) != k
    assert loop_cache.key("residual", graph, (y,), {"constants": "mu=1"}) != k
    other = REDNet(1, layers=2, width=8).eval()
    assert loop_cache.key("residual", _Residual(StepGraph(other, torch.float32).eval()),
                          (y,)) != k


def test_off_or_unbuildable_means_compiling_in_process(case, cache, monkeypatch, caplog):
    monkeypatch.setenv("APUDAE_LOOP_CACHE", "0")
    engine, _ = _purify(case)
    assert isinstance(engine.residual, torch.nn.Module) and not cache.exists()
    monkeypatch.setenv("APUDAE_LOOP_CACHE", "1")

    def broken(*args, **kwargs):
        raise RuntimeError("export failed: unsupported op")

    monkeypatch.setattr(loop_cache, "_build", broken)
    with caplog.at_level(logging.WARNING, logger="apudae_engine.backends.loop_cache"):
        engine, res = _purify(case)
    assert "export failed" in caplog.text and isinstance(engine.residual, torch.nn.Module)
    assert torch.isfinite(res.images).all()
