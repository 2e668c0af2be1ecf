"""Checkpoints: round trip, metadata, and one clear error for every kind of damage."""

from __future__ import annotations

import json

import pytest
import torch

from apudae_engine.core.errors import CheckpointError
from apudae_engine.method.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from apudae_engine.method.models import REDNet, SmallCNN


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = REDNet(channels=1, layers=3, width=8).eval()
    meta = CheckpointMeta("dae", (1, 28, 28), training={"command": "apudae-engine train-dae"},
                          calibration={"mu": 1.5, "sigma": 0.25, "n": 10, "data": "x"})
    save_checkpoint(model, tmp_path / "m" / "dae", meta)
    return model, tmp_path / "m"


def test_round_trip_gives_identical_outputs(saved):
    model, folder = saved
    x = torch.rand(2, 1, 28, 28)
    for ref in (folder, folder / "dae.json", folder / "dae.safetensors", folder / "dae"):
        ck = load_checkpoint(ref, "dae")
        assert torch.equal(ck.model(x), model(x))
    assert ck.calibration["mu"] == 1.5 and ck.input_shape == (1, 28, 28)
    assert ck.meta["training"]["command"].startswith("apudae-engine")
    assert not any(p.requires_grad for p in ck.model.parameters())


def test_weights_file_is_safetensors_not_pickle(saved):
    _, folder = saved
    head = (folder / "dae.safetensors").read_bytes()[:8]
    header_len = int.from_bytes(head, "little")
    header = json.loads((folder / "dae.safetensors").read_bytes()[8:8 + header_len])
    assert any(k.startswith("encoder.") for k in header)


@pytest.mark.parametrize("damage, message", [
    ("flip_byte", "SHA-256"),
    ("bad_json", "not readable JSON"),
    ("no_weights", "cannot be read"),
    ("wrong_kind", "expected a classifier"),
    ("foreign_json", "not an apudae-engine checkpoint"),
    ("wrong_arch", "do not fit architecture"),
    ("missing", "no dae checkpoint"),
])
def test_damaged_checkpoints_fail_clearly(saved, tmp_path, damage, message):
    _, folder = saved
    kind = "dae"
    jpath, wpath = folder / "dae.json", folder / "dae.safetensors"
    meta = json.loads(jpath.read_text())
    if damage == "flip_byte":
        data = bytearray(wpath.read_bytes())
        data[-1] ^= 0xFF
        wpath.write_bytes(bytes(data))
    elif damage == "bad_json":
        jpath.write_text("{not json")
    elif damage == "no_weights":
        wpath.unlink()
    elif damage == "wrong_kind":
        kind = "classifier"
        jpath = folder / "classifier.json"
        jpath.write_text(json.dumps({**meta, "kind": "dae"}))
        (folder / "classifier.safetensors").write_bytes(wpath.read_bytes())
    elif damage == "foreign_json":
        jpath.write_text(json.dumps({"hello": 1}))
    elif damage == "wrong_arch":
        jpath.write_text(json.dumps({**meta, "config": {"channels": 1, "layers": 3,
                                                        "width": 16}}))
    elif damage == "missing":
        folder = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(folder if damage != "wrong_kind" else jpath, kind)


def test_classifier_checkpoint_keeps_labels(tmp_path):
    clf = SmallCNN(1, 3, 28)
    save_checkpoint(clf, tmp_path / "c", CheckpointMeta("classifier", (1, 28, 28),
                                                         labels=["a", "b", "c"]))
    ck = load_checkpoint(tmp_path / "c.json", "classifier")
    assert ck.meta["labels"] == ["a", "b", "c"]


def test_meta_validation():
    with pytest.raises(ValueError, match="kind"):
        CheckpointMeta("gan", (1, 2, 2))
    with pytest.raises(ValueError, match="input_shape"):
        CheckpointMeta("dae", (1, 2))
