"""adam_step_triton against adam_step_ref (and torch.optim.Adam) over odd shapes and dtypes."""

from __future__ import annotations

import pytest
import torch

from apudae_kernels.adam_step import adam_step_triton
from apudae_kernels.reference import adam_step_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(1,), (3, 17), (7, 784), (3, 3 * 32 * 32 + 5)]
HYPER = {"lr": 2 / 255, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
# float32 follows the reference operation for operation (no FMA, correctly rounded sqrt and
# division), so it agrees to an ulp or two. float16/bfloat16 inputs are computed in float32 and
# rounded once on store; they are compared with the reference run in float32 on the same
# (rounded) inputs and rounded the same way: one ulp of the dtype, with atol at its smallest
# subnormal. The reference run in float16 itself is no yardstick: its eps (1e-8) underflows to
# 0, so a zero gradient gives 0/0 = NaN (see test_float16_zero_gradient_stays_finite).
TOLERANCES = {
    torch.float32: {"rtol": 1e-6, "atol": 1e-6},
    torch.float16: {"rtol": 2**-10, "atol": 2**-24},
    torch.bfloat16: {"rtol": 2**-7, "atol": 1e-30},
}


def _state(shape: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    """param, grad, exp_avg, exp_avg_sq as a purification run would hold them (float32)."""
    g = torch.Generator().manual_seed(seed)
    param = 0.01 * torch.randn(shape, generator=g)
    grad = torch.randn(shape, generator=g)
    grad[..., ::5] = 0.0  # inactive pixels: zero gradient
    exp_avg = 0.05 * torch.randn(shape, generator=g)
    exp_avg_sq = 1e-3 * torch.rand(shape, generator=g)
    return [t.to(DEVICE) for t in (param, grad, exp_avg, exp_avg_sq)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_float32_matches_reference_over_steps(shape: tuple[int, ...]) -> None:
    param, grad, exp_avg, exp_avg_sq = _state(shape)
    got = want = (param, exp_avg, exp_avg_sq)
    for step in (1, 2, 3, 13):
        got = adam_step_triton(got[0], grad, got[1], got[2], step, **HYPER)
        want = adam_step_ref(want[0], grad, want[1], want[2], step, **HYPER)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_low_precision_matches_float32_reference(
    shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    inputs = [t.to(dtype) for t in _state(shape)]
    for step in (1, 7):
        got = adam_step_triton(*inputs, step, **HYPER)
        want = adam_step_ref(*(t.float() for t in inputs), step, **HYPER)
        for a, b in zip(got, want, strict=True):
            assert a.dtype == dtype
            torch.testing.assert_close(a, b.to(dtype), **TOLERANCES[dtype])


def test_mixed_dtypes_keep_each_dtype() -> None:
    param, grad, exp_avg, exp_avg_sq = _state((3, 17))
    got = adam_step_triton(param.half(), grad.half(), exp_avg, exp_avg_sq, 2, **HYPER)
    want = adam_step_ref(param.half().float(), grad.half().float(), exp_avg, exp_avg_sq, 2, **HYPER)
    assert [t.dtype for t in got] == [torch.float16, torch.float32, torch.float32]
    torch.testing.assert_close(got[0], want[0].half(), **TOLERANCES[torch.float16])
    torch.testing.assert_close(got[1], want[1], **TOLERANCES[torch.float32])
    torch.testing.assert_close(got[2], want[2], **TOLERANCES[torch.float32])


def test_float16_zero_gradient_stays_finite() -> None:
    zeros = torch.zeros(2, 9, dtype=torch.float16, device=DEVICE)
    param, exp_avg, exp_avg_sq = adam_step_triton(zeros, zeros, zeros, zeros, 1, **HYPER)
    assert torch.equal(param, zeros) and torch.equal(exp_avg, zeros)
    assert torch.equal(exp_avg_sq, zeros)


def test_matches_torch_optim_adam() -> None:
    param, grad, exp_avg, exp_avg_sq = _state((3, 17))
    p = param.clone().requires_grad_()
    betas = (HYPER["beta1"], HYPER["beta2"])
    opt = torch.optim.Adam([p], lr=HYPER["lr"], betas=betas, eps=HYPER["eps"], foreach=False)
    mine = (param, torch.zeros_like(param), torch.zeros_like(param))
    for step in range(1, 5):
        p.grad = grad * step
        opt.step()
        mine = adam_step_triton(mine[0], grad * step, mine[1], mine[2], step, **HYPER)
    # Adam updates exp_avg with lerp, the reference with a multiply-add: an ulp apart per step.
    torch.testing.assert_close(mine[0], p.detach(), rtol=1e-5, atol=1e-7)


def test_inplace_writes_into_the_inputs() -> None:
    param, grad, exp_avg, exp_avg_sq = _state((3, 17))
    want = adam_step_triton(param, grad, exp_avg, exp_avg_sq, 3, **HYPER)
    got = adam_step_triton(param, grad, exp_avg, exp_avg_sq, 3, **HYPER, inplace=True)
    assert got[0] is param and got[1] is exp_avg and got[2] is exp_avg_sq
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_not_inplace_leaves_inputs_alone() -> None:
    state = _state((3, 17))
    before = [t.clone() for t in state]
    adam_step_triton(*state, 1, **HYPER)
    assert all(torch.equal(a, b) for a, b in zip(state, before, strict=True))


def test_non_contiguous_inputs() -> None:
    state = [t.t() for t in _state((17, 3))]
    got = adam_step_triton(*state, 2, **HYPER)
    want = adam_step_ref(*state, 2, **HYPER)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **TOLERANCES[torch.float32])
    with pytest.raises(ValueError, match="contiguous"):
        adam_step_triton(*state, 2, **HYPER, inplace=True)


def test_bad_arguments_raise() -> None:
    param, grad, exp_avg, exp_avg_sq = _state((3, 17))
    with pytest.raises(ValueError, match="shape of param"):
        adam_step_triton(param, grad[:, :4], exp_avg, exp_avg_sq, 1, **HYPER)
    with pytest.raises(ValueError, match="step counts from 1"):
        adam_step_triton(param, grad, exp_avg, exp_avg_sq, 0, **HYPER)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        adam_step_triton(param.double(), grad, exp_avg, exp_avg_sq, 1, **HYPER)
    with pytest.raises(ValueError, match="no backward"):
        adam_step_triton(param.requires_grad_(), grad, exp_avg, exp_avg_sq, 1, **HYPER)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_realistic_size(dtype: torch.dtype) -> None:
    inputs = [t.cuda().to(dtype) for t in _state((256, 3 * 32 * 32))]
    got = adam_step_triton(*inputs, 5, **HYPER)
    want = adam_step_ref(*(t.float() for t in inputs), 5, **HYPER)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b.to(dtype), **TOLERANCES[dtype])
