"""Checkpoint format: safetensors weights beside a JSON metadata file. Nothing is unpickled.

A checkpoint ``<stem>`` is two files, ``<stem>.safetensors`` and ``<stem>.json``. The JSON
holds the architecture and its config, the input shape and value range, calibration
statistics (DAEs), the command and metrics of training, and the SHA-256 of the weights file,
which is checked on every load so a damaged or swapped file is caught.

A model *name* (``fmnist``) refers to a directory bundled with the package holding
``dae.*`` and ``classifier.*``; a *path* may name either file of a pair, the stem, or a
directory holding ``dae.json``/``classifier.json``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from apudae_engine.core.errors import CheckpointError
from apudae_engine.core.files import write_atomic
from apudae_engine.method.checkpoint_schema import validate_metadata, weights_path
from apudae_engine.method.models import arch_name, build_model, model_config

FORMAT = "apudae-engine/checkpoint"
FORMAT_VERSION = 1
KINDS = ("dae", "classifier")
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "models_data"
DEFAULT_MODEL = "fmnist"


@dataclass
class Checkpoint:
    """A loaded model with its metadata. ``model`` is in eval mode on the CPU."""

    model: nn.Module
    meta: dict[str, Any]
    path: Path

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        i = self.meta["input"]
        return int(i["channels"]), int(i["height"]), int(i["width"])

    @property
    def calibration(self) -> dict[str, Any] | None:
        return self.meta.get("calibration")

    @property
    def weights_sha256(self) -> str:
        return self.meta["weights_sha256"]

    @property
    def purify_defaults(self) -> dict[str, Any] | None:
        """Tuned purification settings per method (``apudae-engine tune``), or None."""
        return self.meta.get("purify_defaults")


@dataclass
class CheckpointMeta:
    """What a caller supplies when saving; the rest of the JSON is derived."""

    kind: str
    input_shape: tuple[int, int, int]
    training: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    labels: list[str] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"checkpoint kind must be one of {KINDS}, got {self.kind!r}")
        if len(self.input_shape) != 3 or min(self.input_shape) < 1:
            raise ValueError(f"input_shape must be (C, H, W), got {self.input_shape}")


def save_checkpoint(model: nn.Module, stem: str | Path, meta: CheckpointMeta) -> Path:
    """Write ``<stem>.safetensors`` and ``<stem>.json``; returns the JSON path."""
    from safetensors.torch import save

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = save(state)
    wpath = stem.with_suffix(".safetensors")
    write_atomic(wpath, weights)
    c, h, w = meta.input_shape
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": meta.kind,
        "arch": arch_name(model),
        "config": model_config(model),
        "input": {"channels": c, "height": h, "width": w, "value_range": [0.0, 1.0]},
        "calibration": meta.calibration,
        "labels": meta.labels,
        "training": meta.training,
        "weights_file": wpath.name,
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    jpath = stem.with_suffix(".json")
    write_atomic(jpath, (json.dumps(doc, indent=2) + "\n").encode())
    return jpath


def update_metadata(json_path: Path, **fields: Any) -> None:
    """Replace top-level metadata fields (for example ``calibration``) of a saved checkpoint."""
    doc = json.loads(Path(json_path).read_text())
    doc.update(fields)
    write_atomic(Path(json_path), (json.dumps(doc, indent=2) + "\n").encode())


def bundled_models() -> list[str]:
    """Names of the models shipped inside the package."""
    if not BUNDLED_DIR.is_dir():
        return []
    return sorted(d.name for d in BUNDLED_DIR.iterdir() if (d / "dae.json").is_file())


def resolve_checkpoint(name_or_path: str | Path, kind: str) -> Path:
    """Find the JSON file of a ``kind`` checkpoint from a bundled name or a path."""
    p = Path(name_or_path)
    bundled = BUNDLED_DIR / str(name_or_path)
    if not p.exists() and "/" not in str(name_or_path) and bundled.is_dir():
        p = bundled
    if p.is_dir():
        p = p / f"{kind}.json"
    elif p.suffix == ".safetensors" or p.suffix != ".json":
        p = p.with_suffix(".json")
    if not p.is_file():
        known = bundled_models()
        raise CheckpointError(
            f"no {kind} checkpoint at {name_or_path!s} (looked for {p}); give a bundled model "
            f"name ({', '.join(known) or 'none installed'}) or a path to a checkpoint's .json"
        )
    return p


def load_checkpoint(name_or_path: str | Path, kind: str) -> Checkpoint:
    """Load and verify a checkpoint of the given kind (``dae`` or ``classifier``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    jpath = resolve_checkpoint(name_or_path, kind)
    try:
        meta = json.loads(jpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{jpath}: metadata is not readable JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{jpath}: not an apudae-engine checkpoint (missing format tag)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{jpath}: checkpoint format version {meta.get('format_version')} "
                              f"is not supported (this engine reads {FORMAT_VERSION})")
    if meta.get("kind") != kind:
        raise CheckpointError(f"{jpath}: is a {meta.get('kind')} checkpoint, expected a {kind}")
    validate_metadata(meta, jpath, kind)  # every field, with limits, before anything is built
    wpath = weights_path(meta, jpath)
    try:
        data = wpath.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{wpath}: weights file cannot be read ({exc.strerror})") from None
    if hashlib.sha256(data).hexdigest() != meta.get("weights_sha256"):
        raise CheckpointError(f"{wpath}: weights do not match the SHA-256 recorded in {jpath.name}"
                              " (damaged or replaced file)")
    try:
        state = load(data)
        with torch.device("meta"):  # shapes only: a config that does not fit allocates nothing
            shapes = {k: tuple(v.shape) for k, v in
                      build_model(meta["arch"], meta["config"]).state_dict().items()}
        if shapes != {k: tuple(v.shape) for k, v in state.items()}:
            wrong = sorted(set(shapes) ^ set(state)) or sorted(
                k for k in shapes if shapes[k] != tuple(state[k].shape))
            raise ValueError(f"{len(wrong)} tensors differ, first {wrong[0]}")
        model = build_model(meta["arch"], meta["config"])
        model.load_state_dict(state, strict=True)
    except (SafetensorError, ValueError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{jpath}: weights do not fit architecture "
                              f"{meta.get('arch')!r} ({first})") from None
    model.eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    return Checkpoint(model=model, meta=meta, path=jpath)


def classifier_source(model: str | Path, classifier: str | Path | None = None) -> Path | str | None:
    """Where the classifier for ``model`` is: ``classifier`` itself when given, else the
    ``classifier.json`` beside the DAE (a bundled model's folder, or the DAE's own folder);
    None when ``classifier`` is ``"none"`` or the model has no classifier beside it."""
    if classifier is not None:
        return None if str(classifier).lower() == "none" else classifier
    bundled = BUNDLED_DIR / str(model)
    folder = bundled if bundled.is_dir() else Path(model)
    if not folder.is_dir():
        folder = folder.parent
    return folder if (folder / "classifier.json").is_file() else None


def load_classifier(model: str | Path = DEFAULT_MODEL, classifier: str | Path | None = None,
                    device: str | torch.device = "cpu") -> Checkpoint | None:
    """The classifier checkpoint that goes with ``model`` (see :func:`classifier_source`), its
    module in eval mode on ``device``; None when there is none or ``classifier="none"``.

    Example::

        clf = load_classifier("fmnist").model          # the bundled Fashion-MNIST ResNet
        logits = clf(images)                           # images (N, 1, 28, 28) in [0, 1]
    """
    source = classifier_source(model, classifier)
    if source is None:
        return None
    ckpt = load_checkpoint(source, "classifier")
    ckpt.model.to(device)
    return ckpt
