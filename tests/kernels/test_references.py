"""kernels/reference.py on its own: the noise hash, the per-image error and Adam as specified.

The fused kernel is tested against these references in test_adaptive_update.py; here the
references are tested against their own definitions (the hash written out in plain Python,
float64 sums, torch.optim.Adam), so that a change to the spec cannot pass by changing both
sides. Not named test_reference.py: tests/engine/method/ has one, and test modules need unique
basenames in this suite.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from apudae_kernels.reference import adam_step_ref, squared_error_ref, uniform_noise_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MASK32 = 0xFFFFFFFF
# (seed, step): small values, values past 2**31 / 2**32 and negatives, which all wrap to 32 bits.
KEYS = [(0, 1), (1234, 13), (2**40 + 5, 2**33 + 3), (-7, 2**31 + 1)]
# Ids outside [0, 2**32) too: the reference keeps their low 32 bits.
ID_POOL = [0, 5, 2**32 - 1, 2**33 + 1, -3, 17, 1_000_003]
ADAM = {"lr": 2 / 255, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}


def _mix32(x: int) -> int:
    """lowbias32 on one Python int, written out apart from the reference's tensor code."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def _noise_value(seed: int, image_id: int, step: int, j: int) -> float:
    """Element j of one image's noise, from the documented hash in plain Python."""
    key = _mix32(_mix32((seed & MASK32) ^ 0x9E3779B9) ^ (image_id & MASK32))
    key = _mix32((key + step) & MASK32)
    h = _mix32(_mix32(key ^ j))
    return 2.0 * (h >> 8) / 2**24 - 1.0  # exact: 24-bit values


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that equality is bit equality (and -0.0 != 0.0)."""
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


# --------------------------------------------------------------------------------------------
# uniform_noise_ref
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_noise_is_the_documented_hash_bit_for_bit(dtype: torch.dtype) -> None:
    ids = torch.tensor(ID_POOL, device=DEVICE)
    d = 37
    for seed, step in KEYS:
        got = uniform_noise_ref(seed, ids, step, d, dtype)
        assert got.shape == (len(ID_POOL), d) and got.dtype == dtype and got.device == ids.device
        want = torch.tensor(
            [[_noise_value(seed, i, step, j) for j in range(d)] for i in ID_POOL],
            dtype=torch.float32,
        ).to(dtype)  # the reference rounds the float32 value once to the dtype
        assert torch.equal(_bits(got.cpu()), _bits(want)), (seed, step)


def test_noise_keys_wrap_to_32_bits() -> None:
    ids = torch.tensor([3, 9], device=DEVICE)
    want = uniform_noise_ref(5, ids, 3, 40)
    assert torch.equal(uniform_noise_ref(2**32 + 5, ids, 2**32 + 3, 40), want)
    assert torch.equal(uniform_noise_ref(5, ids + 2**32, 3, 40), want)


def test_noise_float32_range_and_spread() -> None:
    u = uniform_noise_ref(3, torch.arange(4, device=DEVICE), 1, 4096)
    assert u.min() >= -1.0 and u.max() < 1.0
    assert abs(u.mean().item()) < 0.02 and abs(u.var().item() - 1 / 3) < 0.02


def test_noise_keys_change_the_noise() -> None:
    ids = torch.arange(2, device=DEVICE)
    base = uniform_noise_ref(1, ids, 1, 64)
    assert not torch.equal(base, uniform_noise_ref(2, ids, 1, 64))  # seed
    assert not torch.equal(base, uniform_noise_ref(1, ids, 2, 64))  # step
    assert not torch.equal(base[0], base[1])  # image id


def test_noise_id_dtype_does_not_matter() -> None:
    ids = torch.tensor([0, 9, 4], device=DEVICE)
    want = uniform_noise_ref(5, ids, 2, 33)
    for dtype in (torch.int32, torch.int16, torch.uint8):
        assert torch.equal(uniform_noise_ref(5, ids.to(dtype), 2, 33), want)


def test_noise_empty() -> None:
    assert uniform_noise_ref(0, torch.arange(3, device=DEVICE), 1, 0).shape == (3, 0)
    empty_ids = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    assert uniform_noise_ref(0, empty_ids, 1, 5).shape == (0, 5)


@settings(max_examples=20, deadline=None)
@given(
    ids=st.lists(st.integers(-(2**40), 2**40), min_size=1, max_size=6),
    data=st.data(),
    seed=st.integers(0, 2**32 - 1),
    step=st.integers(1, 100),
)
def test_noise_does_not_depend_on_the_batch(
    ids: list[int], data: st.DataObject, seed: int, step: int
) -> None:
    d = 19
    full = uniform_noise_ref(seed, torch.tensor(ids, device=DEVICE), step, d)
    perm = data.draw(st.permutations(range(len(ids))), label="perm")
    lo = data.draw(st.integers(0, len(ids) - 1), label="lo")
    hi = data.draw(st.integers(lo + 1, len(ids)), label="hi")
    picked = perm[lo:hi]
    sub = uniform_noise_ref(seed, torch.tensor([ids[i] for i in picked], device=DEVICE), step, d)
    assert torch.equal(sub, full[picked])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_noise_on_cuda_equals_the_cpu(dtype: torch.dtype) -> None:
    ids = torch.arange(64) * 7 + 3
    got = uniform_noise_ref(11, ids.cuda(), 5, 3 * 32 * 32 + 5, dtype)
    want = uniform_noise_ref(11, ids, 5, 3 * 32 * 32 + 5, dtype)
    assert torch.equal(_bits(got.cpu()), _bits(want))


# --------------------------------------------------------------------------------------------
# squared_error_ref
# --------------------------------------------------------------------------------------------


def _pair(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(shape, generator=g)
    recon = (y + 0.1 * torch.randn(shape, generator=g)).clamp(0, 1)
    return y.to(DEVICE, dtype), recon.to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (3, 3, 32, 32), (2, 40_000)], ids=str)
def test_squared_error_is_a_float32_sum_per_image(
    shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    y, recon = _pair(shape, dtype)
    got = squared_error_ref(y, recon)
    assert got.shape == (shape[0],) and got.dtype == torch.float32
    # The difference is taken in the input dtype, then summed in float32.
    want = (y - recon).double().flatten(1).square().sum(dim=1)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_squared_error_identical_inputs_give_zero() -> None:
    y, _ = _pair((3, 100), torch.float32)
    assert torch.equal(squared_error_ref(y, y), torch.zeros(3, device=DEVICE))


def test_squared_error_float64_stays_float64() -> None:
    y, recon = _pair((2, 50), torch.float64)
    got = squared_error_ref(y, recon)
    assert got.dtype == torch.float64
    assert torch.equal(got, ((y - recon) ** 2).sum(dim=1))


def test_squared_error_mixed_dtypes_promote() -> None:
    y, recon = _pair((4, 3, 8, 8), torch.float32)
    got = squared_error_ref(y, recon.half())
    torch.testing.assert_close(got, squared_error_ref(y, recon.half().float()))
    assert got.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# adam_step_ref
# --------------------------------------------------------------------------------------------


def _adam_state(shape: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    """param, grad, exp_avg, exp_avg_sq as a purification run would hold them (float32)."""
    g = torch.Generator().manual_seed(seed)
    param = 0.01 * torch.randn(shape, generator=g)
    grad = torch.randn(shape, generator=g)
    grad[..., ::5] = 0.0  # inactive pixels: zero gradient
    exp_avg = 0.05 * torch.randn(shape, generator=g)
    exp_avg_sq = 1e-3 * torch.rand(shape, generator=g)
    return [t.to(DEVICE) for t in (param, grad, exp_avg, exp_avg_sq)]


def test_adam_matches_torch_optim_adam() -> None:
    param, grad, _, _ = _adam_state((3, 17))
    p = param.clone().requires_grad_()
    betas = (ADAM["beta1"], ADAM["beta2"])
    opt = torch.optim.Adam([p], lr=ADAM["lr"], betas=betas, eps=ADAM["eps"], foreach=False)
    mine = (param, torch.zeros_like(param), torch.zeros_like(param))
    for step in range(1, 5):
        p.grad = grad * step
        opt.step()
        mine = adam_step_ref(mine[0], grad * step, mine[1], mine[2], step, **ADAM)
    # Adam updates exp_avg with lerp, the reference with a multiply-add: an ulp apart per step.
    torch.testing.assert_close(mine[0], p.detach(), rtol=1e-5, atol=1e-7)


def test_adam_leaves_its_inputs_alone() -> None:
    state = _adam_state((3, 17))
    before = [t.clone() for t in state]
    adam_step_ref(*state, 1, **ADAM)
    assert all(torch.equal(a, b) for a, b in zip(state, before, strict=True))


def test_adam_non_contiguous_inputs() -> None:
    state = _adam_state((17, 3))
    got = adam_step_ref(*(t.t() for t in state), 2, **ADAM)
    want = adam_step_ref(*(t.t().contiguous() for t in state), 2, **ADAM)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
