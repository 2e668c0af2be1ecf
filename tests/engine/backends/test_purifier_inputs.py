"""The Purifier module's contract with its callers: eval mode, image ids, the [0, 1] range."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apudae_engine import Purifier, PurifyConfig


@pytest.fixture(scope="module")
def purifier():
    return Purifier.from_pretrained("fmnist", PurifyConfig(seed=0, steps=2))


def _images(n=3):
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def test_from_pretrained_is_in_eval_mode_and_train_keeps_the_dae_frozen(purifier):
    assert not purifier.training and not purifier.dae.training
    seq = torch.nn.Sequential(purifier, torch.nn.Identity()).train()
    assert purifier.training and not purifier.dae.training  # BatchNorm keeps calibrated stats
    seq.eval()
    assert not purifier.training


@pytest.mark.parametrize("as_ids", [list, tuple, np.array, torch.tensor])
def test_image_ids_accept_any_sequence_of_ints(purifier, as_ids):
    x = _images()
    want = purifier.purify(x, torch.tensor([7, 8, 9])).images
    got = purifier.purify(x, image_ids=as_ids([7, 8, 9])).images
    assert torch.equal(got, want)
    assert torch.equal(purifier(x, as_ids([7, 8, 9])), want)
    # The ids key the noise: other ids give other images.
    assert not torch.equal(purifier.purify(x, [1, 2, 3]).images, want)


def test_image_ids_must_be_integers(purifier):
    with pytest.raises(TypeError, match="image_ids must be integers"):
        purifier.purify(_images(), image_ids=["a.png", "b.png", "c.png"])
    with pytest.raises(TypeError, match="image_ids must be integers"):
        purifier.purify(_images(), image_ids=[0.5, 1.5, 2.5])


def test_images_in_0_255_are_refused_with_the_fix(purifier):
    x = _images() * 255
    with pytest.raises(ValueError, match=r"expected float images in \[0, 1\].*divide 8-bit "
                                         r"images by 255"):
        purifier(x)
    with pytest.raises(ValueError, match=r"got values from -0.4999 to 0.4998$"):
        purifier.purify(_images() - 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        purifier(torch.full((1, 1, 28, 28), float("nan")))


def test_rounding_just_outside_0_1_is_accepted(purifier):
    x = _images()
    x[0, 0, 0, 0], x[0, 0, 0, 1] = 1.0005, -0.0005
    assert purifier(x).shape == x.shape
