"""The JVP/VJP gradient through the adaptive loop equals autograd's double backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from apudae_engine.method.config import PurifyConfig
from apudae_engine.method.fast_gradient import (
    HingeGradient,
    adaptive_purify_hvp,
    piecewise_linear,
)
from apudae_engine.method.models import REDNet
from apudae_engine.method.purification import adaptive_purify, iterative_purify


def _dae() -> nn.Module:
    """A small float64 REDNet with non-trivial eval-mode BatchNorm statistics."""
    torch.manual_seed(0)
    dae = REDNet(channels=1, layers=3, width=6).double()
    for m in dae.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    return dae.eval()


def _images(n: int = 4) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return 0.2 + 0.6 * torch.rand(n, 1, 12, 12, generator=gen, dtype=torch.float64)


def _mu_between(dae, x):
    """mu between the images' errors (none on the hinge's kink): some active, some not."""
    from apudae_engine.method.purification import reconstruction_error

    with torch.no_grad():
        r = reconstruction_error(dae, x).sort().values
    return float(r[1] + r[2]) / 2


def test_hessian_vector_product_equals_double_backward():
    dae, x = _dae(), _images()
    mu, sigma = _mu_between(dae, x), 0.7
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
    y = x.clone().requires_grad_(True)
    g, _ = HingeGradient.apply(y, dae, mu, sigma, True)
    (fast,) = torch.autograd.grad(g, y, v)
    y2 = x.clone().requires_grad_(True)
    r = ((y2 - dae(y2)) ** 2).flatten(1).sum(1)
    loss = (torch.clamp(r - mu, min=0.0) ** 2).sum() / sigma**2
    (g2,) = torch.autograd.grad(loss, y2, create_graph=True)
    torch.testing.assert_close(g, g2.detach(), rtol=1e-12, atol=1e-12)
    (slow,) = torch.autograd.grad(g2, y2, v)
    assert slow.abs().sum() > 0
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("noise", [False, True])
def test_gradient_through_the_adaptive_loop_equals_autograd(noise):
    dae, x = _dae(), _images()
    mu, sigma = _mu_between(dae, x), 0.7
    config = PurifyConfig(steps=5, noise=noise, seed=3)
    ids = torch.arange(4)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=x.dtype)

    xa = x.clone().requires_grad_(True)
    ref = adaptive_purify(dae, xa, mu, sigma, config, ids, differentiable=True).images
    (slow,) = torch.autograd.grad((ref * w).sum(), xa)
    xb = x.clone().requires_grad_(True)
    out = adaptive_purify_hvp(dae, xb, mu, sigma, config, ids)
    (fast,) = torch.autograd.grad((out * w).sum(), xb)
    torch.testing.assert_close(out.detach(), ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-12)


def test_gradient_through_the_iterative_loop_equals_autograd():
    dae, x = _dae(), _images()
    config = PurifyConfig(method="iterative", steps=4)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=x.dtype)
    xa = x.clone().requires_grad_(True)
    ref = iterative_purify(dae, xa, config, differentiable=True).images
    (slow,) = torch.autograd.grad((ref * w).sum(), xa)
    xb = x.clone().requires_grad_(True)
    (fast,) = torch.autograd.grad((adaptive_purify_hvp(dae, xb, 0.0, 1.0, config) * w).sum(), xb)
    torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-12)


def test_only_piecewise_linear_daes_qualify():
    assert piecewise_linear(_dae())
    assert not piecewise_linear(nn.Sequential(nn.Conv2d(1, 1, 3), nn.Tanh()))
    assert not piecewise_linear(REDNet(channels=1, layers=2, width=4).train())
