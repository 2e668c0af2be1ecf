"""Checkpoints: round trip, metadata, and one clear error for every kind of damage."""

from __future__ import annotations

import json
import re

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


# -- every field of the JSON is checked at load time (issue 12, items 4 and 6) ------------------


def _set(doc: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        doc = doc[key]
    if value is _DELETE:
        del doc[last]
    else:
        doc[last] = value


_DELETE = object()


@pytest.mark.parametrize("field, value, message", [
    ("weights_file", "../../etc/passwd", "field 'weights_file' must be a plain file name"),
    ("weights_file", "/etc/passwd", "field 'weights_file' must be a plain file name"),
    ("weights_file", 5, "field 'weights_file' must be a plain file name"),
    ("input", _DELETE, "field 'input' is missing"),
    ("input.height", -28, "field 'input.height' must lie in"),
    ("input.channels", 3, "field 'input.channels' is 3 but the weights take"),
    ("calibration.mu", "2.5", "field 'calibration.mu' must be a finite number"),
    ("calibration.mu", float("nan"), "field 'calibration.mu' must be a finite number"),
    ("calibration.sigma", float("inf"), "field 'calibration.sigma' must be a finite number"),
    ("calibration.sigma", 0.0, "field 'calibration.sigma' must be positive"),
    ("calibration", [1.5, 0.25], "field 'calibration' must be a JSON object"),
    ("config.layers", 5_000_000, "field 'config.layers' must lie in"),
    ("config.width", "8", "field 'config.width' must be an integer"),
    ("config.depth", 3, "field 'config.depth' is not a keyword of rednet"),
    ("arch", "gan", "field 'arch' names no known architecture"),
    ("purify_defaults", [13], "field 'purify_defaults' must be a JSON object"),
    ("purify_defaults", {"adaptiv": {}}, "field 'purify_defaults.adaptiv' names no method"),
    ("purify_defaults", {"adaptive": {"steps": 0}},
     "field 'purify_defaults.adaptive.steps' must lie in [1, 200]"),
    ("purify_defaults", {"adaptive": {"steps": 12.5}},
     "field 'purify_defaults.adaptive.steps' must be an integer"),
    ("purify_defaults", {"adaptive": {"lr": 0.0}},
     "field 'purify_defaults.adaptive.lr' must lie in [1e-06, 1]"),
    ("purify_defaults", {"adaptive": {"lr": "0.01"}},
     "field 'purify_defaults.adaptive.lr' must be a finite number"),
    ("purify_defaults", {"adaptive": {"noise_eps": 7.0}},
     "field 'purify_defaults.adaptive.noise_eps' must lie in [0, 1]"),
    ("purify_defaults", {"adaptive": {"beta1": 0.5}},
     "field 'purify_defaults.adaptive.beta1' is not a tunable setting"),
])
def test_every_metadata_field_is_validated(saved, field, value, message):
    _, folder = saved
    jpath = folder / "dae.json"
    doc = json.loads(jpath.read_text())
    _set(doc, field, value)
    jpath.write_text(json.dumps(doc))  # NaN/Infinity are written as Python's json writes them
    with pytest.raises(CheckpointError, match=re.escape(message)) as err:
        load_checkpoint(folder, "dae")
    assert str(jpath) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("labels, message", [
    (["a", "b"], "field 'labels' has 2 names for 3 classes"),
    ("abc", "field 'labels' must be a list of class names"),
    ([1, 2, 3], "field 'labels' must be a list of class names"),
])
def test_classifier_labels_must_name_every_class(tmp_path, labels, message):
    save_checkpoint(SmallCNN(1, 3, 28), tmp_path / "c",
                    CheckpointMeta("classifier", (1, 28, 28), labels=["a", "b", "c"]))
    doc = json.loads((tmp_path / "c.json").read_text())
    doc["labels"] = labels
    (tmp_path / "c.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_checkpoint(tmp_path / "c.json", "classifier")


def test_a_config_that_does_not_fit_the_weights_allocates_nothing(saved, monkeypatch):
    """A JSON asking for a bigger network than its weights fails on shapes (meta tensors)."""
    import apudae_engine.method.checkpoint as checkpoint

    _, folder = saved
    jpath = folder / "dae.json"
    doc = json.loads(jpath.read_text())
    doc["config"]["layers"], doc["config"]["width"] = 64, 1024  # ~1.2e9 parameters if built
    jpath.write_text(json.dumps(doc))
    built = []
    real = checkpoint.build_model
    monkeypatch.setattr(checkpoint, "build_model", lambda *a: (
        built.append(next(real(*a).parameters()).device.type), real(*a))[1])
    with pytest.raises(CheckpointError, match="do not fit architecture"):
        load_checkpoint(folder, "dae")
    assert "cpu" not in built
