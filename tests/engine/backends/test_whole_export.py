"""The whole purification exported as one graph equals the reference: torch.export program,
onnxruntime and AOTInductor, two batch sizes, noise on and off, default and given ids/seed;
and `export --whole` + onnxruntime reproduces `purify`'s PNGs for the bundled samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from apudae_engine.backends.aoti import package_whole
from apudae_engine.backends.export import WHOLE_FORMAT, export_whole, model_hash
from apudae_engine.backends.whole_graph import WholePurification, default_inputs
from apudae_engine.backends.whole_runtime import WholeArtifact
from apudae_engine.cli import main
from apudae_engine.method.config import PurifyConfig
from apudae_engine.method.models import REDNet
from apudae_engine.method.purification import adaptive_purify, reconstruction_error
from apudae_engine.perf.verify import TOLERANCES
from apudae_kernels.reference import uniform_noise_ref

SHAPE = (1, 12, 12)
TOL = TOLERANCES["fp32"]


@pytest.fixture(scope="module")
def calibrated():
    torch.manual_seed(0)
    dae = REDNet(1, layers=2, width=8).eval()
    for p in dae.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        r = reconstruction_error(dae, torch.rand(16, *SHAPE))
    # mu inside the range of r: some images start active, some not, and some get flagged
    return dae, float(r.median()), float(r.std()) / 4


def _threshold(calibrated):
    _, mu, sigma = calibrated
    return mu + 2 * sigma


def _reference(calibrated, config, x, ids=None, seed=None):
    dae, mu, sigma = calibrated
    if seed is not None:
        config = config.with_(seed=seed)
    with torch.no_grad():
        ref = adaptive_purify(dae, x, mu, sigma, config, ids)
        r_after = reconstruction_error(dae, ref.images)
    flagged = ref.error_before > _threshold(calibrated)
    return ref, r_after, flagged


def _assert_matches(out, ref, r_after, flagged):
    diff = (out["purified"] - ref.images).abs()
    assert float(diff.max()) <= TOL["max_abs_diff"]
    assert float(diff.mean()) <= TOL["mean_abs_diff"]
    assert float((diff > 1 / 255).float().mean()) <= TOL["frac_over_1_255"]
    torch.testing.assert_close(out["r_before"], ref.error_before, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["r_after"], r_after, rtol=1e-3, atol=1e-3)
    assert torch.equal(out["active_steps"], ref.active_steps)
    assert torch.equal(out["flagged"], flagged)


@pytest.fixture(scope="module", params=[True, False], ids=["noise", "no-noise"])
def exported(request, calibrated, tmp_path_factory):
    dae, mu, sigma = calibrated
    config = PurifyConfig(steps=3, noise=request.param, seed=11)
    stem = tmp_path_factory.mktemp("whole") / "whole"
    paths = export_whole(dae, SHAPE, stem, mu, sigma, config, _threshold(calibrated),
                         max_batch=64)
    return config, paths


@pytest.mark.slow  # two exports of the unrolled loop to ONNX (about a minute each)
@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_whole_graph_matches_reference(calibrated, exported, runtime):
    config, paths = exported
    art = WholeArtifact(paths["json"], runtime)
    for n in (1, 5):  # two batch sizes through one graph
        x = torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(n))
        _assert_matches(art.run(x), *_reference(calibrated, config, x))
        ids = torch.arange(100, 100 + n)
        _assert_matches(art.run(x, ids, seed=5), *_reference(calibrated, config, x, ids, 5))
    ref = _reference(calibrated, config, x)[0]
    assert int(ref.active_steps.sum()) > 0 and (ref.images - x).abs().max() > 1e-3


def test_noise_hash_is_bit_exact_in_onnxruntime(tmp_path):
    """The int64 hash (masked 32-bit multiplies, shifts, xor) through ONNX BitShift and
    Bitwise* ops gives the reference's noise bit for bit, for a seed given as an input."""
    import onnxruntime as ort

    class Noise(torch.nn.Module):
        def forward(self, ids, seed):
            return uniform_noise_ref(seed, ids, 7, 300)

    ids = torch.tensor([0, 1, 2**31 + 5, 2**32 - 1, 123456789], dtype=torch.int64)
    seed = torch.tensor(2**32 - 3, dtype=torch.int64)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(Noise(), (ids, seed), dynamic_shapes=({0: batch}, None))
    torch.onnx.export(program, dynamo=True, opset_version=18).save(str(tmp_path / "n.onnx"))
    session = ort.InferenceSession(str(tmp_path / "n.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"ids": ids.numpy(), "seed": seed.numpy()})
    assert np.array_equal(got, uniform_noise_ref(2**32 - 3, ids, 7, 300).numpy())


@pytest.mark.slow
def test_sidecar_names_model_calibration_settings_and_signature(calibrated, exported):
    dae, mu, sigma = calibrated
    config, paths = exported
    doc = json.loads(paths["json"].read_text())
    assert doc["format"] == WHOLE_FORMAT and doc["model_sha256"] == model_hash(dae)
    assert doc["calibration"]["mu"] == mu and doc["calibration"]["sigma"] == sigma
    assert doc["calibration"]["flag_threshold"] == _threshold(calibrated)
    assert doc["settings"] == config.to_dict()
    assert [i["name"] for i in doc["signature"]["inputs"]] == ["images", "image_ids", "seed"]
    assert doc["outputs"] == ["purified", "r_before", "r_after", "active_steps", "flagged"]
    assert doc["files"] == {"pt2": "whole.pt2", "onnx": "whole.onnx"}
    assert doc["batch"] == {"min": 1, "max": 64}
    import onnx

    graph = onnx.load(str(paths["onnx"])).graph
    assert [(v.name, v.type.tensor_type.shape.dim[0].dim_param) for v in graph.input[:2]] == [
        ("images", "N"), ("image_ids", "N")]
    assert all(v.type.tensor_type.shape.dim[0].dim_param == "N" for v in graph.output)


def test_whole_graph_with_classifier_adds_logits(calibrated):
    dae, mu, sigma = calibrated
    torch.manual_seed(1)
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(144, 4)).eval()
    graph = WholePurification(dae, mu, sigma, PurifyConfig(seed=0, steps=2), 1.0, clf).eval()
    x = torch.rand(3, *SHAPE)
    with torch.no_grad():
        out = dict(zip(graph.output_names, graph(*default_inputs(x))))
        torch.testing.assert_close(out["logits"], clf(out["purified"]))
    assert graph.output_names[-1] == "logits"


def test_whole_graph_refuses_other_methods(calibrated):
    dae, mu, sigma = calibrated
    with pytest.raises(ValueError, match="adaptive"):
        WholePurification(dae, mu, sigma, PurifyConfig(seed=0, method="iterative"), 1.0)


def test_artifact_errors_name_the_file(tmp_path):
    from apudae_engine.core.errors import UserError

    bad = tmp_path / "step.json"
    bad.write_text(json.dumps({"format": "apudae-engine/step-graph"}))
    with pytest.raises(UserError, match="not a whole-purification export"):
        WholeArtifact(bad)


@pytest.mark.slow
def test_export_whole_command_with_classifier(tiny_model, tmp_path, capsys):
    from apudae_engine.backends.purifier import Purifier
    from apudae_engine.method.checkpoint import load_classifier

    assert main(["export", "--whole", "--model", str(tiny_model), "--with-classifier",
                 "--steps", "2", "--seed", "9", "--flag-k", "1", "--max-batch", "8",
                 "--out", str(tmp_path / "w")]) == 0
    assert "onnx: " in capsys.readouterr().out
    doc = json.loads((tmp_path / "w.json").read_text())
    assert doc["outputs"][-1] == "logits" and doc["settings"]["seed"] == 9
    assert doc["source"]["labels"] == [f"c{i}" for i in range(10)]
    x = torch.rand(3, 1, 28, 28)
    purifier = Purifier.from_pretrained(tiny_model, PurifyConfig(steps=2, seed=9, flag_k=1.0))
    ref = purifier.purify(x)
    clf = load_classifier(str(tiny_model)).model
    for runtime in ("torch", "onnxruntime"):
        out = WholeArtifact(tmp_path / "w.json", runtime).run(x)
        assert (out["purified"] - ref.images).abs().max() <= TOL["max_abs_diff"]
        assert torch.equal(out["flagged"], ref.error_before > purifier.flag_threshold())
        with torch.no_grad():
            torch.testing.assert_close(out["logits"], clf(out["purified"]), rtol=1e-4,
                                       atol=1e-4)


def test_export_whole_command_needs_calibration_and_adaptive_settings(tiny_model, tmp_path,
                                                                      capsys):
    assert main(["export", "--whole", "--model", str(tiny_model), "--steps", "0", "--no-onnx",
                 "--out", str(tmp_path / "w")]) == 2
    assert "steps must be at least 1" in capsys.readouterr().err


@pytest.mark.slow
def test_whole_graph_aoti_matches_reference(calibrated, tmp_path):
    dae, mu, sigma = calibrated
    config = PurifyConfig(steps=2, seed=3)
    paths = export_whole(dae, SHAPE, tmp_path / "w", mu, sigma, config, _threshold(calibrated),
                         max_batch=64, onnx=False)
    assert package_whole(paths["json"]) == tmp_path / "w.aoti.pt2"
    assert json.loads(paths["json"].read_text())["files"]["aoti"] == "w.aoti.pt2"
    art = WholeArtifact(paths["json"], "aoti")
    for n in (2, 7):
        x = torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(n))
        _assert_matches(art.run(x), *_reference(calibrated, config, x))


@pytest.mark.slow
def test_export_whole_command_reproduces_purify_pngs(tmp_path):
    """`export --whole` then onnxruntime gives `purify`'s PNGs for the bundled samples."""
    from apudae_engine.folder.local import path_identity
    from apudae_engine.images.codec import discover_images, load_image, to_uint8

    samples = Path(__import__("apudae_engine").__file__).parent / "samples"
    out = tmp_path / "purified"
    assert main(["purify", "--input", str(samples), "--output", str(out), "--classifier",
                 "none", "--seed", "4"]) == 0
    assert main(["export", "--whole", "--model", "fmnist", "--seed", "4", "--max-batch", "64",
                 "--out", str(tmp_path / "fmnist_whole")]) == 0
    art = WholeArtifact(tmp_path / "fmnist_whole.json", "onnxruntime")
    files = list(discover_images(samples))
    rels = [str(f.relative_to(samples)) for f in files]
    x = torch.from_numpy(np.stack([load_image(f, 1, (28, 28)) for f in files])).float() / 255
    ids = torch.tensor([path_identity(r) for r in rels], dtype=torch.int64)
    got = art.run(x, ids)
    records = {}
    for line in (out / "manifest.jsonl").read_text().splitlines():
        rec = json.loads(line)
        records[rec["path"]] = rec
    expected = np.stack([load_image(out / Path(r).with_suffix(".png"), 1) for r in rels])
    produced = to_uint8(got["purified"])
    diff = np.abs(produced.astype(np.int16) - expected.astype(np.int16)) / 255.0
    assert diff.max() <= TOL["max_abs_diff"]
    assert diff.mean() <= TOL["mean_abs_diff"]
    assert (diff > 1 / 255 + 1e-9).mean() <= TOL["frac_over_1_255"]
    for i, rel in enumerate(rels):
        rec = records[rel]
        assert float(got["r_before"][i]) == pytest.approx(rec["r_before"], rel=1e-4, abs=1e-4)
        assert float(got["r_after"][i]) == pytest.approx(rec["r_after"], rel=1e-3, abs=1e-3)
        assert bool(got["flagged"][i]) == rec["flagged"]
        assert int(got["active_steps"][i]) == rec["active_steps"]
    assert any(r["flagged"] for r in records.values())
