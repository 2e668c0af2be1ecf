"""squared_error_triton against squared_error_ref over odd shapes and dtypes."""

from __future__ import annotations

import pytest
import torch

from apudae_kernels.reference import squared_error_ref
from apudae_kernels.squared_error import squared_error_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (3, 17), (7, 784), (3, 3, 32, 32), (2, 3 * 32 * 32 + 5), (2, 40_000)]
# The output is float32 for every input dtype and the kernel rounds the difference to the input
# dtype as the reference does, so only the summation order differs: one tolerance for all.
RTOL, ATOL = 1e-6, 1e-6


def _pair(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(shape, generator=g)
    recon = (y + 0.1 * torch.randn(shape, generator=g)).clamp(0, 1)
    return y.to(DEVICE, dtype), recon.to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    y, recon = _pair(shape, dtype)
    got = squared_error_triton(y, recon)
    assert got.shape == (shape[0],) and got.dtype == torch.float32
    torch.testing.assert_close(got, squared_error_ref(y, recon), rtol=RTOL, atol=ATOL)


def test_identical_inputs_give_zero() -> None:
    y, _ = _pair((3, 100), torch.float32)
    assert torch.equal(squared_error_triton(y, y), torch.zeros(3, device=DEVICE))


def test_non_contiguous_and_mixed_dtype_inputs() -> None:
    y, recon = _pair((4, 3, 8, 8), torch.float32)
    y_t, recon_t = y.transpose(2, 3), recon.transpose(2, 3)  # same values per image, strided
    torch.testing.assert_close(
        squared_error_triton(y_t, recon_t), squared_error_ref(y_t, recon_t), rtol=RTOL, atol=ATOL
    )
    torch.testing.assert_close(
        squared_error_triton(y, recon.half()),
        squared_error_ref(y, recon.half()),
        rtol=RTOL,
        atol=ATOL,
    )


def test_empty_batch() -> None:
    y = torch.zeros(0, 5, device=DEVICE)
    assert squared_error_triton(y, y).shape == (0,)


def test_bad_arguments_raise() -> None:
    y, recon = _pair((2, 5), torch.float32)
    with pytest.raises(ValueError, match="same shape"):
        squared_error_triton(y, recon[:, :4])
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        squared_error_triton(y.double(), recon.double())
    with pytest.raises(ValueError, match="no backward"):
        squared_error_triton(y.requires_grad_(), recon)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(256, 3, 32, 32), (8, 3, 224, 224)], ids=str)
def test_cuda_realistic_sizes(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    y, recon = (t.cuda() for t in _pair(shape, dtype))
    # Long rows: two summation orders over ~1.5e5 terms, so a little more room.
    torch.testing.assert_close(
        squared_error_triton(y, recon), squared_error_ref(y, recon), rtol=1e-5, atol=1e-5
    )
