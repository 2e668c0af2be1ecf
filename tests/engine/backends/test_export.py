"""Export of the step graph: torch.export with a dynamic batch, ONNX via onnxruntime, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from apudae_engine.backends.export import export_program, export_step, model_hash
from apudae_engine.backends.step_graph import autograd_step
from apudae_engine.cli import main
from apudae_engine.method.models import REDNet

SHAPE = (1, 12, 12)


@pytest.fixture(scope="module")
def dae():
    torch.manual_seed(0)
    model = REDNet(1, layers=2, width=8).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def test_exported_program_takes_two_batch_sizes(dae):
    program = export_program(dae, SHAPE).module()
    for n in (1, 5):
        y = torch.rand(n, *SHAPE)
        with torch.no_grad():
            r, g = program(y)
        r_ref, g_ref = autograd_step(dae, y)
        assert r.shape == (n,) and g.shape == (n, *SHAPE)
        torch.testing.assert_close(r, r_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


def test_reduced_precision_program_is_explicitly_typed(dae):
    """The tensorrt backend compiles this program with explicit typing: it must take float32
    images, compute its hidden convolutions in bf16 and return float32 values close to
    autograd's."""
    ep = export_program(dae, SHAPE, dtype=torch.bfloat16)
    convs = [n.meta["val"].dtype for n in ep.graph.nodes
             if n.op == "call_function" and "conv" in str(n.target)]
    # The hidden layers run in bf16 (StepGraph keeps the thin input and output layers and
    # the error in float32).
    assert convs.count(torch.bfloat16) >= len(convs) // 2
    y = torch.rand(5, *SHAPE)
    with torch.no_grad():
        r, g = ep.module()(y)
    r_ref, g_ref = autograd_step(dae, y)
    assert r.dtype == g.dtype == torch.float32
    torch.testing.assert_close(r, r_ref, rtol=0.02, atol=1e-3)
    cos = torch.nn.functional.cosine_similarity(g.flatten(1), g_ref.flatten(1), dim=1)
    assert cos.min() > 0.98


def test_tensorrt_compile_options_follow_the_installed_api():
    from apudae_engine.backends.tensorrt import compile_options

    def new_api(program, *, use_explicit_typing=True, enabled_precisions=None,
                disable_tf32=False):
        pass

    def old_api(program, *, enabled_precisions=None, disable_tf32=False):
        pass

    assert compile_options(new_api, torch.float32) == {"use_explicit_typing": True,
                                                       "disable_tf32": True}
    assert compile_options(new_api, torch.float16) == {"use_explicit_typing": True}
    assert compile_options(old_api, torch.bfloat16) == {"enabled_precisions": {torch.bfloat16}}


def test_export_step_writes_program_and_sidecar(dae, tmp_path):
    paths = export_step(dae, SHAPE, tmp_path / "step", mu=1.5, sigma=0.5, max_batch=64,
                        onnx=False, source={"checkpoint": "test"})
    assert set(paths) == {"pt2", "json"}
    doc = json.loads(paths["json"].read_text())
    assert doc["model_sha256"] == model_hash(dae)
    assert doc["calibration"] == {"mu": 1.5, "sigma": 0.5}
    assert (doc["input"]["channels"], doc["input"]["height"], doc["input"]["width"]) == SHAPE
    assert doc["batch"] == {"min": 1, "max": 64}
    assert doc["files"] == {"pt2": "step.pt2"}
    loaded = torch.export.load(paths["pt2"]).module()
    y = torch.rand(3, *SHAPE)
    with torch.no_grad():
        r, _ = loaded(y)
    torch.testing.assert_close(r, autograd_step(dae, y)[0], rtol=1e-5, atol=1e-5)


def test_model_hash_changes_with_the_weights(dae):
    other = REDNet(1, layers=2, width=8).eval()
    other.load_state_dict(dae.state_dict())
    assert model_hash(other) == model_hash(dae)
    with torch.no_grad():
        other.head.bias.add_(1e-3)
    assert model_hash(other) != model_hash(dae)


def test_onnx_matches_torch_in_onnxruntime(dae, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="install the 'onnx' extra")
    pytest.importorskip("onnxscript", reason="install the 'onnx' extra")
    paths = export_step(dae, SHAPE, tmp_path / "step", mu=1.0, sigma=1.0)
    session = ort.InferenceSession(str(paths["onnx"]), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["r", "grad"]
    for n in (1, 7):
        y = torch.rand(n, *SHAPE)
        r, g = session.run(None, {"images": y.numpy()})
        r_ref, g_ref = autograd_step(dae, y)
        torch.testing.assert_close(torch.from_numpy(r), r_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.from_numpy(g), g_ref, rtol=1e-4, atol=1e-5)


def test_export_command(tiny_model, tmp_path, capsys):
    rc = main(["export", "--model", str(tiny_model), "--out", str(tmp_path / "x" / "step.pt2"),
               "--no-onnx", "--max-batch", "16"])
    assert rc == 0
    doc = json.loads((tmp_path / "x" / "step.json").read_text())
    assert doc["input"]["height"] == 28 and doc["calibration"]["mu"] > 0
    dae_json = json.loads((tiny_model / "dae.json").read_text())
    assert doc["source"]["weights_sha256"] == dae_json["weights_sha256"]
    assert doc["calibration"]["mu"] == dae_json["calibration"]["mu"]
    assert (tmp_path / "x" / "step.pt2").is_file()
    assert "pt2:" in capsys.readouterr().out


def test_export_command_rejects_a_bad_batch_bound(tiny_model, tmp_path, capsys):
    assert main(["export", "--model", str(tiny_model), "--out", str(tmp_path / "s"),
                 "--max-batch", "0"]) == 2
    assert "--max-batch" in capsys.readouterr().err


def test_export_aoti_is_for_the_whole_purification(tiny_model, tmp_path, capsys):
    # The C++ runner loads only the whole-purification package; a step package had no user.
    assert main(["export", "--model", str(tiny_model), "--out", str(tmp_path / "s"),
                 "--aoti"]) == 2
    assert "add --whole" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
