"""adaptive_update_triton (one fused launch) against adaptive_update_ref."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from apudae_kernels.adaptive_update import adaptive_update_triton
from apudae_kernels.reference import adaptive_update_ref, uniform_noise_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(1, 1), (3, 17), (7, 784), (3, 3 * 32 * 32 + 5)]
MU, SIGMA = 2.856, 0.923
HYPER = {
    "mu": MU, "sigma": SIGMA, "eps_n": 0.7 / 255, "max_scale": 4.0,
    "lr": 2 / 255, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8,
}  # fmt: skip
# Per-image errors in units of sigma from mu, cycled over the batch: active images (r > mu),
# inactive ones (r < mu: zero hinge, yet noise since the amplitude uses (r - mu)^2), r == mu
# exactly (neither), and both clipped ends of the noise amplitude.
R_OFFSETS = [0.7, -1.5, 10.0, 0.0, 2.5, -5.0, 0.1]
OUTPUTS = ("x", "delta", "exp_avg", "exp_avg_sq")
# float32 follows the reference operation for operation (no FMA, correctly rounded sqrt and
# division), so it agrees to an ulp or two. float16 and bfloat16 run in float32 and round once,
# and are compared with the float32 reference on the same rounded inputs to one ulp of the
# dtype, with atol at its smallest subnormal (the float16 reference itself gives NaN deltas for
# inactive images, whose eps (1e-8) underflows to 0).
TOLERANCES = {
    torch.float32: {"rtol": 1e-6, "atol": 1e-6},
    torch.float16: {"rtol": 2**-10, "atol": 2**-24},
    torch.bfloat16: {"rtol": 2**-7, "atol": 1e-30},
}


def _batch(n: int, d: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """One step's inputs, float32, as the purifier would hold them mid-run."""
    g = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([R_OFFSETS[i % len(R_OFFSETS)] for i in range(n)])
    tensors = {
        "x": torch.rand(n, d, generator=g),
        "delta": 0.01 * torch.randn(n, d, generator=g),
        "grad_r": 0.2 * torch.randn(n, d, generator=g),
        "exp_avg": 0.01 * torch.randn(n, d, generator=g),
        "exp_avg_sq": 1e-4 * torch.rand(n, d, generator=g),
        "r": MU + SIGMA * offsets,
        "image_ids": torch.arange(n) * 3 + 100,
    }
    return {k: v.to(DEVICE) for k, v in tensors.items()}


def _low_precision(b: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The image-sized tensors in ``dtype``; r stays float32 as squared_error returns it."""
    return {k: (v.to(dtype) if k in OUTPUTS or k == "grad_r" else v) for k, v in b.items()}


def _call(fn, b: dict[str, torch.Tensor], step: int, noise: bool, **kw):
    return fn(
        b["x"], b["delta"], b["grad_r"], b["exp_avg"], b["exp_avg_sq"], b["r"], b["image_ids"],
        seed=7, step=step, **HYPER, noise=noise, **kw,
    )  # fmt: skip


def _assert_close(got, want, dtype: torch.dtype) -> None:
    for name, a, b in zip(OUTPUTS, got, want, strict=True):
        assert a.dtype == dtype, name
        torch.testing.assert_close(
            a, b.to(dtype), **TOLERANCES[dtype], msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.parametrize("noise", [True, False], ids=["noise", "no-noise"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_float32_matches_reference_over_steps(shape: tuple[int, int], noise: bool) -> None:
    b = _batch(*shape)
    got, want = dict(b), dict(b)
    for step in (1, 2, 3):
        # A new error each step, as after a DAE pass; both runs follow their own trajectory.
        got["r"] = want["r"] = b["r"] * (1.0 - 0.05 * step)
        out_got = _call(adaptive_update_triton, got, step, noise)
        out_want = _call(adaptive_update_ref, want, step, noise)
        _assert_close(out_got, out_want, torch.float32)
        got.update(zip(OUTPUTS, out_got, strict=True))
        want.update(zip(OUTPUTS, out_want, strict=True))


@pytest.mark.parametrize("noise", [True, False], ids=["noise", "no-noise"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_low_precision_matches_float32_reference(
    shape: tuple[int, int], dtype: torch.dtype, noise: bool
) -> None:
    b = _low_precision(_batch(*shape), dtype)
    upcast = _low_precision(b, torch.float32)
    for step in (1, 4):
        got = _call(adaptive_update_triton, b, step, noise)
        _assert_close(got, _call(adaptive_update_ref, upcast, step, noise), dtype)
        assert all(torch.isfinite(t).all() for t in got)


# (seed, step): small values, values past 2**31 / 2**32 and negatives, which all wrap to 32 bits.
KEYS = [(0, 1), (1234, 13), (2**40 + 5, 2**33 + 3), (-7, 2**31 + 1)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that equality is bit equality (and -0.0 != 0.0)."""
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_noise_is_bit_identical_to_reference(shape: tuple[int, int], dtype: torch.dtype) -> None:
    """x = 0 and an amplitude of exactly 1 (eps_n 1/4 times the clipped 4) leave x' = u: the
    kernel's noise is the reference hash bit for bit, ids and keys wrapped to 32 bits alike."""
    n, d = shape
    b = _low_precision(_batch(n, d), dtype)
    b["x"] = torch.zeros_like(b["x"])
    b["r"] = MU + SIGMA * torch.tensor([10.0, -10.0] * n, device=DEVICE)[:n]
    pool = torch.tensor([0, 5, 2**32 - 1, 2**33 + 1, -3, 17, 1_000_003], dtype=torch.int64)
    b["image_ids"] = pool[:n].to(DEVICE)
    hyper = {**HYPER, "eps_n": 0.25, "max_scale": 4.0}
    for seed, step in KEYS:
        x = adaptive_update_triton(
            b["x"], b["delta"], b["grad_r"], b["exp_avg"], b["exp_avg_sq"], b["r"],
            b["image_ids"], seed=seed, step=step, **hyper,
        )[0]  # fmt: skip
        want = uniform_noise_ref(seed, b["image_ids"], step, d, dtype)
        assert torch.equal(_bits(x), _bits(want)), (seed, step)


def test_no_noise_returns_x_itself() -> None:
    b = _batch(3, 17)
    assert _call(adaptive_update_triton, b, 1, False)[0] is b["x"]


def test_inactive_image_only_receives_noise() -> None:
    """r < mu with fresh Adam state: delta and the state stay exactly zero, x gets noise."""
    b = _batch(2, 33)
    b["r"] = torch.full((2,), MU - 1.5 * SIGMA, device=DEVICE)
    for key in ("delta", "exp_avg", "exp_avg_sq"):
        b[key] = torch.zeros_like(b[key])
    x, delta, exp_avg, exp_avg_sq = _call(adaptive_update_triton, b, 1, True)
    assert not delta.any() and not exp_avg.any() and not exp_avg_sq.any()
    amplitude = HYPER["eps_n"] * 1.5**2 / 4
    assert 0 < (x - b["x"]).abs().max() <= amplitude * (1 + 1e-5)


def test_inplace_writes_into_the_inputs() -> None:
    b = _batch(3, 17)
    want = _call(adaptive_update_triton, b, 2, True)
    got = _call(adaptive_update_triton, b, 2, True, inplace=True)
    for key, a, w in zip(OUTPUTS, got, want, strict=True):
        assert a is b[key] and torch.equal(a, w), key


def test_inplace_without_noise_leaves_x() -> None:
    b = _batch(3, 17)
    x_before = b["x"].clone()
    got = _call(adaptive_update_triton, b, 2, False, inplace=True)
    assert got[0] is b["x"] and torch.equal(b["x"], x_before)


def test_non_contiguous_inputs() -> None:
    b = _batch(3, 17)
    strided = {k: (v.t().contiguous().t() if v.dim() == 2 else v) for k, v in b.items()}
    _assert_close(
        _call(adaptive_update_triton, strided, 1, True),
        _call(adaptive_update_ref, b, 1, True),
        torch.float32,
    )
    with pytest.raises(ValueError, match="contiguous"):
        _call(adaptive_update_triton, strided, 1, True, inplace=True)


@pytest.mark.parametrize(
    ("key", "bad", "match"),
    [
        ("grad_r", lambda t: t[:, :5], "shape of x"),
        ("r", lambda t: t[:2], r"shape \(N,\)"),
        ("image_ids", lambda t: t.float(), "integer"),
        ("exp_avg", lambda t: t.double(), "float32, float16 or bfloat16"),
        ("grad_r", lambda t: t.requires_grad_(), "no backward"),
    ],
)
def test_bad_arguments_raise(key: str, bad, match: str) -> None:
    b = _batch(3, 17)
    b[key] = bad(b[key])
    with pytest.raises(ValueError, match=match):
        _call(adaptive_update_triton, b, 1, True)


def test_bad_step_raises() -> None:
    with pytest.raises(ValueError, match="step counts from 1"):
        _call(adaptive_update_triton, _batch(3, 17), 0, True)


@settings(max_examples=10, deadline=None)
@given(data=st.data(), n=st.integers(1, 6), step=st.integers(1, 20))
def test_each_image_is_independent_of_its_batch(data: st.DataObject, n: int, step: int) -> None:
    b = _batch(n, 23, seed=n)
    full = _call(adaptive_update_triton, b, step, True)
    picked = data.draw(st.permutations(range(n)), label="perm")[: data.draw(st.integers(1, n))]
    sub = _call(adaptive_update_triton, {k: v[picked] for k, v in b.items()}, step, True)
    for a, c in zip(sub, full, strict=True):
        assert torch.equal(a, c[picked])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_realistic_size(dtype: torch.dtype) -> None:
    b = {k: v.cuda() for k, v in _batch(256, 3 * 32 * 32).items()}
    low = _low_precision(b, dtype)
    upcast = _low_precision(low, torch.float32)
    for step in (1, 13):
        _assert_close(
            _call(adaptive_update_triton, low, step, True),
            _call(adaptive_update_ref, upcast, step, True),
            dtype,
        )
