"""Export the step graph (r and dr/dy per image) as a torch.export program and as ONNX.

``export_step`` writes ``<stem>.pt2`` (``torch.export.save``), ``<stem>.onnx`` and
``<stem>.json``, a sidecar naming the model's hash, its calibration (mu, sigma), the input
shape and the dynamic batch range, so a serving runtime can run the purification loop around
the graph (the update is ``apudae_kernels.reference.adaptive_update_ref``).

Graph signature: ``images`` float32 (N, C, H, W) in [0, 1] -> ``r`` float32 (N,) and ``grad``
float32 (N, C, H, W) = dr/d(images); N is dynamic in [1, max_batch].

Example::

    paths = export_step(dae, (1, 28, 28), "out/fmnist_step", mu=2.67, sigma=1.53)
    program = torch.export.load(paths["pt2"]).module()
    r, grad = program(images)

``export_whole`` writes the whole adaptive purification the same way (``export --whole``; graph
signature in ``apudae_engine.backends.whole_graph``), so a runtime needs no copy of the loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from apudae_engine._version import __version__
from apudae_engine.backends.step_graph import StepGraph
from apudae_engine.core.errors import UserError
from apudae_engine.method.config import PurifyConfig

log = logging.getLogger(__name__)
FORMAT = "apudae-engine/step-graph"
WHOLE_FORMAT = "apudae-engine/whole-purification"
INPUT_NAMES, OUTPUT_NAMES = ["images"], ["r", "grad"]


def model_hash(model: nn.Module) -> str:
    """SHA-256 of a model's state (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def export_program(dae: nn.Module, input_shape: tuple[int, int, int], max_batch: int = 4096,
                   dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu") -> torch.export.ExportedProgram:
    """The step graph of ``dae`` as a torch.export program with a dynamic batch dimension."""
    graph = StepGraph(dae, dtype).to(device).eval()
    example = torch.rand(2, *input_shape, device=device)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    with torch.no_grad():
        return torch.export.export(graph, (example,), dynamic_shapes={"y": {0: batch}})


def export_step(dae: nn.Module, input_shape: tuple[int, int, int], stem: str | Path,
                mu: float | None = None, sigma: float | None = None, max_batch: int = 4096,
                onnx: bool = True, opset: int = 18,
                source: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write ``<stem>.pt2``, ``<stem>.onnx`` (unless ``onnx=False``) and ``<stem>.json``.

    Args:
        dae: an eval-mode REDNet.
        input_shape: (C, H, W) of the images the graph takes.
        mu, sigma: the DAE's calibration, recorded in the sidecar.
        max_batch: upper bound of the dynamic batch dimension.
        source: extra sidecar fields (for example the checkpoint's path and weights hash).
    Returns the paths written, keyed ``pt2``, ``onnx``, ``json``.
    """
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    program = export_program(dae, input_shape, max_batch)
    paths = {"pt2": stem.with_suffix(".pt2")}
    torch.export.save(program, paths["pt2"])
    if onnx:
        paths["onnx"] = stem.with_suffix(".onnx")
        export_onnx(dae, input_shape, paths["onnx"], max_batch, opset)
    paths["json"] = stem.with_suffix(".json")
    doc = {
        "format": FORMAT,
        "engine": __version__,
        "torch": torch.__version__,
        "model_sha256": model_hash(dae),
        "calibration": {"mu": mu, "sigma": sigma},
        "input": {"channels": input_shape[0], "height": input_shape[1],
                  "width": input_shape[2], "dtype": "float32", "value_range": [0.0, 1.0]},
        "batch": {"min": 1, "max": max_batch},
        "inputs": INPUT_NAMES,
        "outputs": OUTPUT_NAMES,
        "files": {k: p.name for k, p in paths.items() if k != "json"},
        "onnx_opset": opset if onnx else None,
        "source": source or {},
    }
    paths["json"].write_text(json.dumps(doc, indent=2) + "\n")
    return paths


def export_onnx(dae: nn.Module, input_shape: tuple[int, int, int], path: str | Path,
                max_batch: int = 4096, opset: int = 18) -> Path:
    """The step graph as ONNX (inputs ``images``, outputs ``r``, ``grad``; dynamic batch)."""
    try:
        import onnx  # noqa: F401  (the exporter needs it; fail with an install hint)
        import onnxscript  # noqa: F401
    except ImportError:
        raise UserError("ONNX export needs onnx and onnxscript; pip install "
                        "'apudae-engine[onnx]' (or pass --no-onnx)") from None
    graph = StepGraph(dae).cpu().eval()
    example = torch.rand(2, *input_shape)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    # The exporter prints progress to stdout; keep it for the debug log only.
    buf = io.StringIO()
    with torch.no_grad(), contextlib.redirect_stdout(buf):
        torch.onnx.export(graph, (example,), str(path), dynamo=True, opset_version=opset,
                          dynamic_shapes={"y": {0: batch}}, input_names=INPUT_NAMES,
                          output_names=OUTPUT_NAMES)
    log.debug("%s", buf.getvalue())
    return Path(path)


def whole_program(dae: nn.Module, input_shape: tuple[int, int, int], mu: float, sigma: float,
                  config: PurifyConfig, flag_threshold: float,
                  classifier: nn.Module | None = None,
                  max_batch: int = 4096) -> torch.export.ExportedProgram:
    """The whole adaptive purification (``WholePurification``) as a torch.export program with
    a dynamic batch dimension shared by ``images`` and ``image_ids``."""
    from apudae_engine.backends.whole_graph import WholePurification, default_inputs

    graph = WholePurification(dae, mu, sigma, config, flag_threshold, classifier).cpu().eval()
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    dynamic = {"images": {0: batch}, "image_ids": {0: batch}, "seed": None}
    with torch.no_grad():
        return torch.export.export(graph, default_inputs(torch.rand(2, *input_shape)),
                                   dynamic_shapes=dynamic)


def export_whole(dae: nn.Module, input_shape: tuple[int, int, int], stem: str | Path,
                 mu: float, sigma: float, config: PurifyConfig, flag_threshold: float,
                 classifier: nn.Module | None = None, max_batch: int = 4096, onnx: bool = True,
                 opset: int = 18, source: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write the whole purification as ``<stem>.pt2``, ``<stem>.onnx`` and ``<stem>.json``
    (``apudae_engine.backends.aoti.package_whole`` adds the C++ runner's package).

    The sidecar names the model's hash, the calibration, every setting baked into the graph,
    the defaults of the optional inputs and the graph signature (names, dtypes, shapes).

    Args:
        dae: an eval-mode REDNet; mu, sigma: its calibration.
        config: adaptive settings (steps, lr, noise on/off, clip; ``seed`` is the default of
            the ``seed`` input).
        flag_threshold: r_before above it sets ``flagged`` (``Purifier.flag_threshold()``).
        classifier: appended after purification (adds the ``logits`` output).
        source: extra sidecar fields (checkpoint paths and weight hashes).
    Returns the paths written, keyed ``pt2``, ``onnx``, ``json``. The ONNX translation of the
    unrolled loop takes a few minutes on a small CPU.
    """
    from apudae_engine.backends.whole_graph import INPUT_NAMES, WholePurification

    config = config.with_secret_seed()  # the default seed is baked in and recorded
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    program = whole_program(dae, input_shape, mu, sigma, config, flag_threshold, classifier,
                            max_batch)
    outputs = WholePurification.output_names_for(classifier is not None)
    paths = {"pt2": stem.with_suffix(".pt2")}
    torch.export.save(program, paths["pt2"])
    if onnx:
        paths["onnx"] = stem.with_suffix(".onnx")
        _program_to_onnx(program, paths["onnx"], INPUT_NAMES, outputs, opset)
    paths["json"] = stem.with_suffix(".json")
    c, h, w = input_shape
    effective_sigma = float(config.sigma_override or sigma)
    doc = {
        "format": WHOLE_FORMAT,
        "engine": __version__,
        "torch": torch.__version__,
        "model_sha256": model_hash(dae),
        "classifier_sha256": None if classifier is None else model_hash(classifier),
        "calibration": {"mu": float(mu), "sigma": float(sigma),
                        "sigma_in_loop": effective_sigma,
                        "flag_threshold": float(flag_threshold)},
        "settings": config.to_dict(),
        "input": {"channels": c, "height": h, "width": w, "dtype": "float32",
                  "value_range": [0.0, 1.0]},
        "batch": {"min": 1, "max": max_batch},
        "signature": {
            "inputs": [
                {"name": "images", "dtype": "float32", "shape": ["N", c, h, w]},
                {"name": "image_ids", "dtype": "int64", "shape": ["N"],
                 "default": "-1: the image's pixel fingerprint (image_fingerprint)"},
                {"name": "seed", "dtype": "int64", "shape": [],
                 "default": f"-1: the exported seed {config.seed}"},
            ],
            "outputs": [
                {"name": n, "dtype": d, "shape": sh} for n, d, sh in (
                    ("purified", "float32", ["N", c, h, w]), ("r_before", "float32", ["N"]),
                    ("r_after", "float32", ["N"]), ("active_steps", "int64", ["N"]),
                    ("flagged", "bool", ["N"]), ("logits", "float32", ["N", "K"]))
                if n in outputs],
        },
        "inputs": INPUT_NAMES,
        "outputs": outputs,
        "files": {k: p.name for k, p in paths.items() if k != "json"},
        "onnx_opset": opset if onnx else None,
        "source": source or {},
    }
    paths["json"].write_text(json.dumps(doc, indent=2) + "\n")
    return paths


def _program_to_onnx(program: torch.export.ExportedProgram, path: Path, input_names: list[str],
                     output_names: list[str], opset: int) -> Path:
    try:
        import onnx  # noqa: F401  (the exporter needs it; fail with an install hint)
        import onnxscript  # noqa: F401
    except ImportError:
        raise UserError("ONNX export needs onnx and onnxscript; pip install "
                        "'apudae-engine[onnx]' (or pass --no-onnx)") from None
    buf = io.StringIO()
    # The exporter warns that torchvision's ops are not registered (we use none of them) and
    # its graph passes log at INFO; keep the command's output to what the user asked for.
    quiet = {"torch.onnx._internal.exporter._registration": logging.ERROR,
             "onnx_ir": logging.WARNING, "onnxscript": logging.WARNING}
    levels = {name: logging.getLogger(name).level for name in quiet}
    for name, level in quiet.items():
        logging.getLogger(name).setLevel(level)
    try:
        with contextlib.redirect_stdout(buf):
            # optimize=False: onnxscript's optimizer takes minutes on the unrolled loop, and
            # onnxruntime and TensorRT optimise the graph when they load it anyway.
            onnx_program = torch.onnx.export(program, dynamo=True, opset_version=opset,
                                             input_names=input_names,
                                             output_names=output_names, optimize=False)
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    log.debug("%s", buf.getvalue())
    onnx_program.save(str(path))
    _name_batch_dimension(path)
    return path


def _name_batch_dimension(path: Path, name: str = "N") -> None:
    """Call the graph inputs' and outputs' symbolic dimension ``name`` (the exporter names it
    after its internal symbol, e.g. ``s34``), as the sidecar and TensorRT profiles do."""
    import onnx

    model = onnx.load(str(path))
    for value in list(model.graph.input) + list(model.graph.output):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = name
    onnx.save(model, str(path))
