"""A model's tuned purify_defaults: which settings they fill, and where they reach."""

from __future__ import annotations

import json
import shutil

import pytest

from apudae_engine.backends.purifier import Purifier
from apudae_engine.cli import main
from apudae_engine.method.checkpoint import BUNDLED_DIR
from apudae_engine.method.config import PurifyConfig

TUNED = {"adaptive": {"steps": 5, "lr": 0.01, "noise_eps": 0.004, "noise_max_scale": 9.0},
         "tuning": {"command": "test"}}


@pytest.fixture
def tuned_model(tmp_path):
    """A copy of the bundled fmnist model whose DAE JSON carries TUNED."""
    folder = tmp_path / "model"
    shutil.copytree(BUNDLED_DIR / "fmnist", folder)
    doc = json.loads((folder / "dae.json").read_text())
    doc["purify_defaults"] = TUNED
    (folder / "dae.json").write_text(json.dumps(doc))
    return folder


def test_unset_settings_take_the_models_values_and_given_ones_stay():
    config = PurifyConfig(seed=1, lr=0.02).with_model_defaults(TUNED)
    assert (config.steps, config.lr, config.noise_eps, config.noise_max_scale) == (
        5, 0.02, 0.004, 9.0)
    assert config.defaults == "tuned" and config.seed == 1
    # A later change of one field keeps the rest; the change itself is the caller's.
    assert config.with_(steps=7).with_model_defaults(TUNED).steps == 7


@pytest.mark.parametrize("config", [
    PurifyConfig(defaults="method"), PurifyConfig.compat(), PurifyConfig(method="iterative"),
    PurifyConfig(steps=13, lr=2 / 255, noise_eps=0.7 / 255, noise_max_scale=4.0)])
def test_method_defaults_compat_other_methods_and_full_configs_are_untouched(config):
    assert config.with_model_defaults(TUNED) == config


def test_unset_names_only_tunable_settings():
    with pytest.raises(ValueError, match="unset may name only"):
        PurifyConfig(unset=frozenset({"seed"}))
    assert PurifyConfig.compat(defaults="model").defaults == "method"


def test_unset_fields_are_complete_and_survive_copies():
    config = PurifyConfig()
    assert (config.steps, config.noise_eps, config.noise_max_scale) == (13, 0.7 / 255, 4.0)
    assert config.unset == {"steps", "lr", "noise_eps", "noise_max_scale"}
    assert config.with_secret_seed().unset == config.unset
    assert "unset" not in config.to_dict() and config.to_dict()["defaults"] == "model"
    # Rebuilt from its record, a resolved config is the same config.
    tuned = config.with_model_defaults(TUNED).with_(seed=3)
    assert PurifyConfig(**tuned.to_dict()) == tuned


def test_a_purifier_from_a_tuned_model_uses_its_defaults(tuned_model):
    assert Purifier.from_pretrained(tuned_model).config.steps == 5
    assert Purifier.from_pretrained(tuned_model, PurifyConfig(steps=3)).config.steps == 3
    kept = Purifier.from_pretrained(tuned_model, PurifyConfig(defaults="method")).config
    assert (kept.steps, kept.defaults) == (13, "method")


def test_purify_records_the_tuned_settings_and_method_defaults_keeps_the_methods(
        tuned_model, tmp_path):
    runs = {}
    for name, extra in (("tuned", []), ("method", ["--method-defaults"]),
                        ("given", ["--steps", "2", "--noise-cap", "6"]), ("compat", ["--compat"])):
        out = tmp_path / name
        assert main(["purify", "--input", "engine/samples", "--output", str(out),
                     "--model", str(tuned_model), "--classifier", "none", "--seed", "1",
                     *extra]) == 0
        runs[name] = json.loads((out / "run.json").read_text())["config"]
    assert (runs["tuned"]["steps"], runs["tuned"]["noise_max_scale"]) == (5, 9.0)
    assert runs["tuned"]["defaults"] == "tuned"
    assert (runs["method"]["steps"], runs["method"]["lr"]) == (13, 2 / 255)
    assert (runs["given"]["steps"], runs["given"]["noise_max_scale"],
            runs["given"]["lr"]) == (2, 6.0, 0.01)
    # --compat is the authors' code: their settings, never the model's tuned ones.
    assert (runs["compat"]["steps"], runs["compat"]["lr"], runs["compat"]["defaults"],
            runs["compat"]["sigma_override"]) == (13, 2 / 255, "method", 0.5)
    manifest = [json.loads(line) for line in (tmp_path / "tuned" / "manifest.jsonl").open()]
    assert {r["steps"] for r in manifest if "steps" in r} == {5}
