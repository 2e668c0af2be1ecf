"""The noise seed of a deployed defense: secret and random unless given, fixed per run."""

from __future__ import annotations

import json

import pytest
import torch

from apudae_engine.backends.purifier import Purifier
from apudae_engine.cli import main
from apudae_engine.method.config import PurifyConfig
from apudae_engine.method.purification import adaptive_purify


def test_a_purifier_without_a_seed_draws_a_secret_one_and_keeps_it():
    a, b = Purifier.from_pretrained("fmnist"), Purifier.from_pretrained("fmnist")
    assert a.seed_is_secret and isinstance(a.config.seed, int)
    assert a.config.seed != b.config.seed  # 32 random bits each
    x = torch.rand(4, 1, 28, 28)  # noise images: far above mu, so the noise is on
    first, again, other = a.purify(x).images, a.purify(x).images, b.purify(x).images
    assert torch.equal(first, again)  # one module purifies an image the same way every time
    assert not torch.equal(first, other)  # and another module's noise differs
    fixed = Purifier.from_pretrained("fmnist", PurifyConfig(seed=7))
    assert fixed.config.seed == 7 and not fixed.seed_is_secret


def test_the_reference_refuses_a_config_without_a_seed():
    dae = Purifier.from_pretrained("fmnist").dae
    with pytest.raises(ValueError, match="seed is None"):
        adaptive_purify(dae, torch.rand(1, 1, 28, 28), 2.0, 1.0, PurifyConfig())


def test_purify_runs_get_secret_seeds_and_record_them(tmp_path):
    samples = "engine/samples"
    outs = [tmp_path / "one", tmp_path / "two"]
    for out in outs:
        assert main(["purify", "--input", samples, "--output", str(out), "--classifier",
                     "none"]) == 0
    runs = [json.loads((out / "run.json").read_text()) for out in outs]
    assert runs[0]["config"]["seed"] != runs[1]["config"]["seed"]
    assert [r["ran"]["seed"] for r in runs] == ["secret", "secret"]
    pngs = [{p.name: p.read_bytes() for p in out.rglob("*.png")} for out in outs]
    assert pngs[0].keys() == pngs[1].keys() and pngs[0] != pngs[1]
    # --seed reproduces a run exactly, whatever seed it had.
    again = tmp_path / "again"
    assert main(["purify", "--input", samples, "--output", str(again), "--classifier", "none",
                 "--seed", str(runs[0]["config"]["seed"])]) == 0
    assert {p.name: p.read_bytes() for p in again.rglob("*.png")} == pngs[0]
    assert json.loads((again / "run.json").read_text())["ran"]["seed"] == "given"
