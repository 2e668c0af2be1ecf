"""The schema of a checkpoint's JSON metadata, checked whole at load time.

The SHA-256 in the JSON covers the weights file only, so every other field is untrusted input:
each is checked here before anything is built, with limits on sizes and layer counts (a JSON
asking for five million layers must fail in microseconds, not allocate). A failure raises
:class:`CheckpointError` naming the file and the field in one line.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from apudae_engine.core.errors import CheckpointError
from apudae_engine.method.config import METHODS, TUNABLE

MAX_CHANNELS = 4
MAX_SIDE = 16384  # input height and width
MAX_CLASSES = 100_000
# Keyword limits per architecture: (min, max) for each integer keyword; all are required.
ARCH_CONFIG: dict[str, dict[str, tuple[int, int]]] = {
    "rednet": {"channels": (1, MAX_CHANNELS), "layers": (2, 64), "width": (1, 1024)},
    "small_cnn": {"channels": (1, MAX_CHANNELS), "classes": (1, MAX_CLASSES),
                  "size": (4, MAX_SIDE)},
    "resnet18_cifar": {"channels": (1, MAX_CHANNELS), "classes": (1, MAX_CLASSES)},
}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Bounds of the tuned settings a JSON may carry (purify_defaults): anything outside is an
# edited file, not a tuning result.
TUNED_LIMITS = {"steps": (1, 200), "lr": (1e-6, 1.0), "noise_eps": (0.0, 1.0),
                "noise_max_scale": (0.0, 1e4)}


def _fail(path: Path, field: str, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: field '{field}' {problem}")


def _get(meta: dict, key: str, path: Path, field: str | None = None) -> Any:
    if key not in meta:
        raise _fail(path, field or key, "is missing")
    return meta[key]


def _integer(value: Any, path: Path, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(path, field, f"must be an integer, got {value!r:.40}")
    if not low <= value <= high:
        raise _fail(path, field, f"must lie in [{low}, {high}], got {value}")
    return value


def _finite(value: Any, path: Path, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value):
        raise _fail(path, field, f"must be a finite number, got {value!r:.40}")
    return float(value)


def _mapping(value: Any, path: Path, field: str) -> dict:
    if not isinstance(value, dict):
        raise _fail(path, field, f"must be a JSON object, got {type(value).__name__}")
    return value


def weights_path(meta: dict, json_path: Path) -> Path:
    """The weights file a checked JSON names: a plain file name beside the JSON."""
    return json_path.with_name(meta["weights_file"])


def validate_metadata(meta: dict, path: Path, kind: str) -> None:
    """Check every field of a checkpoint JSON (format, version and kind already checked)."""
    arch = _get(meta, "arch", path)
    if arch not in ARCH_CONFIG:
        raise _fail(path, "arch", f"names no known architecture ({', '.join(ARCH_CONFIG)}), "
                    f"got {arch!r:.40}")
    config = _mapping(_get(meta, "config", path), path, "config")
    limits = ARCH_CONFIG[arch]
    for key in config:
        if key not in limits:
            raise _fail(path, f"config.{key}", f"is not a keyword of {arch}")
    for key, (low, high) in limits.items():
        _integer(_get(config, key, path, f"config.{key}"), path, f"config.{key}", low, high)

    inp = _mapping(_get(meta, "input", path), path, "input")
    channels = _integer(_get(inp, "channels", path, "input.channels"), path,
                        "input.channels", 1, MAX_CHANNELS)
    height = _integer(_get(inp, "height", path, "input.height"), path, "input.height", 1,
                      MAX_SIDE)
    width = _integer(_get(inp, "width", path, "input.width"), path, "input.width", 1, MAX_SIDE)
    if channels != config["channels"]:
        raise _fail(path, "input.channels", f"is {channels} but the weights take "
                    f"config.channels = {config['channels']}")
    if arch == "small_cnn" and not height == width == config["size"]:
        raise _fail(path, "input", f"is {height}x{width} but small_cnn was built for "
                    f"config.size = {config['size']}")
    if "value_range" in inp:
        vr = inp["value_range"]
        if not isinstance(vr, list) or len(vr) != 2:
            raise _fail(path, "input.value_range", "must be a list [low, high]")
        for i, v in enumerate(vr):
            _finite(v, path, f"input.value_range[{i}]")

    calibration = meta.get("calibration")
    if calibration is not None:
        _calibration(_mapping(calibration, path, "calibration"), path)

    labels = meta.get("labels")
    if labels is not None:
        if not isinstance(labels, list) or not all(isinstance(v, str) for v in labels):
            raise _fail(path, "labels", "must be a list of class names (strings) or null")
        if kind == "classifier" and len(labels) != config.get("classes"):
            raise _fail(path, "labels", f"has {len(labels)} names for "
                        f"{config.get('classes')} classes")
    defaults = meta.get("purify_defaults")
    if defaults is not None:
        _purify_defaults(_mapping(defaults, path, "purify_defaults"), path)
    if "training" in meta and meta["training"] is not None:
        _mapping(meta["training"], path, "training")

    name = _get(meta, "weights_file", path)
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or \
            "\\" in name or "\0" in name or len(name) > 255:
        raise _fail(path, "weights_file", f"must be a plain file name beside {path.name}, got "
                    f"{name!r:.60}")
    sha = _get(meta, "weights_sha256", path)
    if not isinstance(sha, str) or not _SHA256.match(sha):
        raise _fail(path, "weights_sha256", "must be 64 lowercase hex digits")


def _calibration(cal: dict, path: Path) -> None:
    mu = cal.get("mu")
    sigma = cal.get("sigma")
    if mu is None or sigma is None:
        if mu is not None or sigma is not None:
            raise _fail(path, "calibration", "needs both mu and sigma (or neither)")
        return
    _finite(mu, path, "calibration.mu")
    if _finite(sigma, path, "calibration.sigma") <= 0:
        raise _fail(path, "calibration.sigma", f"must be positive, got {sigma}")
    for key in ("flag_fpr",):
        if cal.get(key) is not None:
            _finite(cal[key], path, f"calibration.{key}")
    for key in ("fpr_thresholds", "quantiles"):
        table = cal.get(key)
        if table is None:
            continue
        for rate, value in _mapping(table, path, f"calibration.{key}").items():
            _finite(value, path, f"calibration.{key}.{rate}")


def _purify_defaults(defaults: dict, path: Path) -> None:
    """``{"adaptive": {"steps": 20, "lr": ..., ...}, "tuning": {...}}``: a table of tuned
    settings per method, each within ``TUNED_LIMITS``; ``tuning`` records how they were chosen."""
    for method, table in defaults.items():
        field = f"purify_defaults.{method}"
        if method == "tuning":
            _mapping(table, path, field)
            continue
        if method not in METHODS:
            raise _fail(path, field, f"names no method ({', '.join(METHODS)} or tuning)")
        for key, value in _mapping(table, path, field).items():
            if key not in TUNABLE:
                raise _fail(path, f"{field}.{key}", f"is not a tunable setting "
                            f"({', '.join(TUNABLE)})")
            low, high = TUNED_LIMITS[key]
            if key == "steps":
                _integer(value, path, f"{field}.{key}", low, high)
            elif not low <= _finite(value, path, f"{field}.{key}") <= high:
                raise _fail(path, f"{field}.{key}", f"must lie in [{low:g}, {high:g}], got "
                            f"{value}")
