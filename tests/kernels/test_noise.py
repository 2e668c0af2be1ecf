"""uniform_noise_triton against uniform_noise_ref: bit-identical, batch- and device-independent."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from apudae_kernels.noise import uniform_noise_triton
from apudae_kernels.reference import uniform_noise_ref

# CPU tensors run through the Triton interpreter (tests/conftest.py sets it when there is no GPU).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (3, 17), (7, 784), (3, 3 * 32 * 32 + 5)]
# (seed, step): small values, values past 2**31 / 2**32 and negatives, which all wrap to 32 bits.
KEYS = [(0, 1), (1234, 13), (2**40 + 5, 2**33 + 3), (-7, 2**31 + 1)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that equality is bit equality (and -0.0 != 0.0)."""
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def _ids(n: int) -> torch.Tensor:
    # Ids outside [0, 2**32) too: the reference keeps their low 32 bits.
    pool = torch.tensor([0, 5, 2**32 - 1, 2**33 + 1, -3, 17, 1_000_003], dtype=torch.int64)
    return pool[:n].to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bit_identical_to_reference(shape: tuple[int, int], dtype: torch.dtype) -> None:
    n, d = shape
    ids = _ids(n)
    for seed, step in KEYS:
        got = uniform_noise_triton(seed, ids, step, d, dtype)
        want = uniform_noise_ref(seed, ids, step, d, dtype)
        assert got.shape == (n, d) and got.dtype == dtype and got.device == ids.device
        assert torch.equal(_bits(got), _bits(want)), (seed, step)


def test_float32_range_and_spread() -> None:
    u = uniform_noise_triton(3, torch.arange(4, device=DEVICE), 1, 4096)
    assert u.min() >= -1.0 and u.max() < 1.0
    assert abs(u.mean().item()) < 0.02 and abs(u.var().item() - 1 / 3) < 0.02


def test_keys_change_the_noise() -> None:
    ids = torch.arange(2, device=DEVICE)
    base = uniform_noise_triton(1, ids, 1, 64)
    assert not torch.equal(base, uniform_noise_triton(2, ids, 1, 64))  # seed
    assert not torch.equal(base, uniform_noise_triton(1, ids, 2, 64))  # step
    assert not torch.equal(base[0], base[1])  # image id


def test_id_dtype_does_not_matter() -> None:
    ids = torch.tensor([0, 9, 4], device=DEVICE)
    want = uniform_noise_triton(5, ids, 2, 33)
    for dtype in (torch.int32, torch.int16, torch.uint8):
        assert torch.equal(uniform_noise_triton(5, ids.to(dtype), 2, 33), want)


def test_empty() -> None:
    assert uniform_noise_triton(0, torch.arange(3, device=DEVICE), 1, 0).shape == (3, 0)
    empty_ids = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    assert uniform_noise_triton(0, empty_ids, 1, 5).shape == (0, 5)


@pytest.mark.parametrize(
    ("ids", "dtype", "match"),
    [
        (torch.zeros(2, 2, dtype=torch.int64), torch.float32, "shape"),
        (torch.zeros(2), torch.float32, "integer"),
        (torch.zeros(2, dtype=torch.int64), torch.float64, "dtype"),
    ],
)
def test_bad_arguments_raise(ids: torch.Tensor, dtype: torch.dtype, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        uniform_noise_triton(0, ids.to(DEVICE), 1, 8, dtype)


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
    full = uniform_noise_triton(seed, torch.tensor(ids, device=DEVICE), step, d)
    perm = data.draw(st.permutations(range(len(ids))), label="perm")
    lo = data.draw(st.integers(0, len(ids) - 1), label="lo")
    hi = data.draw(st.integers(lo + 1, len(ids)), label="hi")
    picked = perm[lo:hi]
    sub = uniform_noise_triton(seed, torch.tensor([ids[i] for i in picked], device=DEVICE), step, d)
    assert torch.equal(sub, full[picked])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_cpu_reference(dtype: torch.dtype) -> None:
    ids = torch.arange(64) * 7 + 3
    got = uniform_noise_triton(11, ids.cuda(), 5, 3 * 32 * 32 + 5, dtype)
    want = uniform_noise_ref(11, ids, 5, 3 * 32 * 32 + 5, dtype)  # computed on the CPU
    assert torch.equal(_bits(got.cpu()), _bits(want))
