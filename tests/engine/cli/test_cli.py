"""The command line: fast --version/--help, and the train -> calibrate -> purify workflow."""

from __future__ import annotations

import gzip
import json
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from synthetic import make_digits

from apudae_engine.cli import main
from apudae_engine.method.checkpoint import load_checkpoint
from apudae_engine.method.purification import reconstruction_error


def test_version_and_help_do_not_import_torch():
    code = ("import sys; from apudae_engine.cli import main\n"
            "for argv in (['--help'], ['--version'], ['purify', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "apudae-engine 0." in res.stdout and "--batch" in res.stdout


def _write_idx(path, arr):
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fashion(tmp_path, monkeypatch):
    """A Fashion-MNIST-format folder of blob images: 55,000 + 60 train, 40 test."""
    root = tmp_path / "fm"
    root.mkdir()
    blobs = make_digits(100, seed=3)
    train = np.concatenate([np.zeros((55000, 28, 28), np.uint8), blobs[:60]])
    train[:64] = blobs[:64]
    _write_idx(root / "train-images-idx3-ubyte.gz", train)
    _write_idx(root / "train-labels-idx1-ubyte.gz", np.arange(len(train)) % 10)
    _write_idx(root / "t10k-images-idx3-ubyte.gz", blobs[60:])
    _write_idx(root / "t10k-labels-idx1-ubyte.gz", np.arange(40) % 10)
    monkeypatch.setenv("APUDAE_FASHION_MNIST_DIR", str(root))
    return root


def test_train_calibrate_purify_workflow(fake_fashion, tmp_path, image_folder, capsys):
    stem = tmp_path / "m" / "dae"
    assert main(["train-dae", "--out", str(stem), "--limit", "64", "--epochs", "1",
                 "--layers", "2", "--width", "4", "--batch", "32"]) == 0
    meta = json.loads(stem.with_suffix(".json").read_text())
    assert meta["training"]["metrics"]["denoise_psnr_db"] > 0
    assert meta["calibration"] is None
    assert stem.with_suffix(".log").read_text().count("epoch 1") == 1
    # Adaptive purification needs calibration first: one clear error.
    out = tmp_path / "o"
    assert main(["purify", "--input", str(image_folder), "--output", str(out), "--model",
                 str(stem), "--classifier", "none"]) == 2
    assert "calibrate" in capsys.readouterr().err
    assert main(["calibrate", "--model", str(stem)]) == 0
    cal = json.loads(stem.with_suffix(".json").read_text())["calibration"]
    assert cal["n"] == 60 and "train[55000:]" in cal["data"]
    # mu and sigma are the mean and std of r over exactly those 60 images (train[55000:]).
    calib = torch.from_numpy(make_digits(100, seed=3)[:60]).float()[:, None] / 255
    with torch.no_grad():
        r = reconstruction_error(load_checkpoint(stem, "dae").model, calib).double()
    assert (cal["mu"], cal["sigma"]) == pytest.approx((r.mean().item(), r.std().item()), rel=1e-5)
    assert main(["purify", "--input", str(image_folder), "--output", str(out), "--model",
                 str(stem), "--classifier", "none"]) == 0
    assert len(list(out.rglob("*.png"))) == 10


def test_train_classifier_records_test_accuracy(fake_fashion, tmp_path):
    stem = tmp_path / "c"
    assert main(["train-classifier", "--out", str(stem), "--limit", "64", "--epochs", "1"]) == 0
    metrics = json.loads(stem.with_suffix(".json").read_text())["training"]["metrics"]
    assert metrics["test_data"].startswith("fashion")
    # The recorded number is the saved classifier's accuracy on the 40 test images.
    clf = load_checkpoint(stem, "classifier").model
    x = torch.from_numpy(make_digits(100, seed=3)[60:]).float()[:, None] / 255
    with torch.no_grad():
        correct = (clf(x).argmax(1) == torch.arange(40) % 10).sum().item()
    assert metrics["test_accuracy"] == correct / 40


def test_bad_model_is_one_line_error(image_folder, tmp_path, capsys):
    assert main(["purify", "--input", str(image_folder), "--output", str(tmp_path / "o"),
                 "--model", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "no dae checkpoint" in err and "fmnist" in err and "Traceback" not in err
