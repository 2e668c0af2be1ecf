"""The forward-only step graph equals autograd: BatchNorm folding, r and dr/dy, subsets."""

from __future__ import annotations

import copy

import pytest
import torch

from apudae_engine.backends.step_graph import StepGraph, autograd_step, fold_rednet
from apudae_engine.method.models import REDNet, SmallCNN


def _rednet(channels: int, layers: int, width: int = 6, seed: int = 0) -> REDNet:
    """A REDNet with non-trivial BatchNorm statistics, some scales negative."""
    torch.manual_seed(seed)
    dae = REDNet(channels, layers=layers, width=width)
    for m in dae.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(-1.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    return dae.eval()


# (channels, layers, height, width): odd sizes exercise the stride-2 output padding.
SHAPES = [(1, 2, 12, 12), (2, 3, 9, 13), (3, 4, 16, 15), (1, 5, 11, 8)]


@pytest.mark.parametrize(("channels", "layers", "h", "w"), SHAPES)
def test_folded_network_equals_module_float64(channels, layers, h, w):
    dae = _rednet(channels, layers).double()
    y = torch.rand(3, channels, h, w, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fold_rednet(dae).forward(y), dae(y), rtol=0, atol=1e-12)


def test_folding_copies_and_leaves_the_module_unchanged():
    dae = _rednet(1, 3)
    before = copy.deepcopy(dae.state_dict())
    folded = fold_rednet(dae)
    for k, v in dae.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert folded.encoder[0].weight.data_ptr() != dae.encoder[0][0].weight.data_ptr()


@pytest.mark.parametrize(("channels", "layers", "h", "w"), SHAPES)
def test_graph_matches_autograd_float64(channels, layers, h, w):
    dae = _rednet(channels, layers).double()
    y = torch.rand(4, channels, h, w, dtype=torch.float64)
    r_ref, g_ref = autograd_step(dae, y)
    with torch.no_grad():
        r, g = StepGraph(dae)(y)
    torch.testing.assert_close(r, r_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


def test_graph_matches_autograd_float32():
    dae = _rednet(1, 4, width=16)
    y = torch.rand(8, 1, 28, 28)
    r_ref, g_ref = autograd_step(dae.double(), y.double())
    with torch.no_grad():
        r, g = StepGraph(dae.float())(y)
    # float32 rounding; a pre-activation within rounding of 0 may flip a ReLU, hence the atol.
    torch.testing.assert_close(r.double(), r_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-4)


def test_gradient_of_a_subset_of_rows_equals_those_rows():
    dae = _rednet(1, 3).double()
    y = torch.rand(5, 1, 10, 10, dtype=torch.float64)
    graph = StepGraph(dae)
    with torch.no_grad():
        r_full, g_full = graph(y)
        r, e, go, pre = graph.residual(y)
        idx = torch.tensor([3, 0])
        g = graph.gradient(e[idx], go[idx], [p[idx] for p in pre])
    torch.testing.assert_close(r, r_full)
    torch.testing.assert_close(g, g_full[idx])


def test_channels_last_changes_layout_not_values():
    dae = _rednet(1, 3).double()
    y = torch.rand(3, 1, 14, 14, dtype=torch.float64)
    graph = StepGraph(dae)
    with torch.no_grad():
        r0, g0 = graph(y)
        graph.net.channels_last = True
        r1, g1 = graph(y)
    torch.testing.assert_close(r1, r0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g1, g0, rtol=1e-10, atol=1e-12)


def test_bfloat16_graph_stays_close_to_float32():
    dae = _rednet(1, 3, width=8)
    y = torch.rand(6, 1, 16, 16)
    with torch.no_grad():
        r32, g32 = StepGraph(dae)(y)
        r16, g16 = StepGraph(dae, torch.bfloat16)(y)
    assert r16.dtype == torch.float32 and g16.dtype == torch.float32
    assert ((r16 - r32).abs() / r32).max() < 0.05
    cos = torch.nn.functional.cosine_similarity(g16.flatten(1), g32.flatten(1), dim=1)
    assert cos.min() > 0.95


def test_buffers_follow_module_dtype_and_device_moves():
    graph = StepGraph(_rednet(1, 2)).double()
    assert graph.dtype == torch.float64
    assert graph.net.encoder[0].weight.dtype == torch.float64


def test_rejects_models_it_was_not_written_for():
    with pytest.raises(TypeError, match="REDNet"):
        fold_rednet(SmallCNN())
    with pytest.raises(ValueError, match="eval mode"):
        fold_rednet(REDNet(1, 2, 4).train())
