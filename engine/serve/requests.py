"""The serving protocol: what a request may hold and what a response holds.

A request is one of:

- an image file as the body (``Content-Type: image/png``, ``image/jpeg`` or
  ``application/octet-stream``): one image; the response holds one result;
- JSON ``{"images": [BASE64, ...]}`` with PNG/JPEG files in base64, or
  ``{"arrays": [ARRAY, ...]}`` with float arrays in [0, 1] of shape (C, H, W) or (H, W).
  Optional keys: ``"ids"`` (one integer per image in [0, 2**32), keying its noise; default
  the image's pixel fingerprint, as ``Purifier.purify``) and ``"output"``: ``"png"`` (default:
  the purified image as base64 PNG) or ``"array"`` (nested lists of floats).

Images are decoded and resized by the engine's policy (``apudae_engine.images.codec``); arrays
must already have the model's shape. The response is JSON ``{"results": [RESULT, ...]}``, one
per image, with ``status``, ``r_before``, ``r_after``, ``active_steps``, ``flagged``, the
purified image (``png`` or ``array``) and, with a classifier, ``label_before``/``label_after``
(and ``class_before``/``class_after`` when the classifier names its labels). ``status`` is
``ok``, or ``rejected`` when the server runs with ``--reject-flagged`` and the image is
flagged: then there is no purified image and no label after purification. A bad request is
answered with HTTP 400 and ``{"error": "ONE LINE naming the input"}``; a request with an
image whose purified result holds NaN or Inf with HTTP 500 and such a line naming it.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

import numpy as np
import torch

from apudae_engine.core.errors import UserError
from apudae_engine.images.codec import ImageError, decode_image

OUTPUTS = ("png", "array")
MAX_IMAGES = 1024  # per request; larger jobs belong to `purify` or `purify-ray`


class RequestError(UserError):
    """A request the server cannot use; the message names the input and is sent as HTTP 400."""


@dataclass
class Item:
    """One image of a request: (C, H, W) float32 in [0, 1], its noise id (None: fingerprint),
    the output format its result wants and its name in messages (``body``, ``images[1]``)."""

    image: torch.Tensor
    image_id: int | None
    output: str
    name: str = "body"


def parse_request(body: bytes, content_type: str | None,
                  shape: tuple[int, int, int]) -> list[Item]:
    """The images of one request, decoded to the model's ``shape`` (C, H, W)."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind == "application/json":
        return _parse_json(body, shape)
    if not body:
        raise RequestError("body: empty request; send an image or JSON {\"images\": [...]}")
    return [Item(_decode(body, "body", shape), None, "png", "body")]


def _decode(data: bytes, name: str, shape: tuple[int, int, int]) -> torch.Tensor:
    try:
        arr = decode_image(data, name, shape[0], shape[1:])
    except ImageError as exc:
        raise RequestError(str(exc)) from None
    return torch.from_numpy(arr.astype(np.float32)) / 255.0


def _parse_json(body: bytes, shape: tuple[int, int, int]) -> list[Item]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(f"body: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or ("images" in doc) == ("arrays" in doc):
        raise RequestError("body: JSON must hold exactly one of \"images\" (base64 PNG/JPEG) "
                           "or \"arrays\" (floats in [0, 1])")
    key = "images" if "images" in doc else "arrays"
    entries = doc[key]
    if not isinstance(entries, list) or not entries:
        raise RequestError(f"{key}: expected a non-empty list")
    if len(entries) > MAX_IMAGES:
        raise RequestError(f"{key}: {len(entries)} images exceed the limit of {MAX_IMAGES} per "
                           "request")
    output = doc.get("output", "png")
    if output not in OUTPUTS:
        raise RequestError(f"output: {output!r} is not one of {', '.join(OUTPUTS)}")
    ids = _ids(doc.get("ids"), len(entries))
    items = []
    for i, entry in enumerate(entries):
        name = f"{key}[{i}]"
        image = _from_base64(entry, name, shape) if key == "images" else \
            _from_array(entry, name, shape)
        items.append(Item(image, ids[i], output, name))
    return items


def _ids(ids, n: int) -> list[int | None]:
    if ids is None:
        return [None] * n
    if not isinstance(ids, list) or len(ids) != n:
        raise RequestError(f"ids: expected a list of {n} integers, one per image")
    for i, v in enumerate(ids):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**32:
            raise RequestError(f"ids[{i}]: {v!r} is not an integer in [0, 2**32)")
    return list(ids)


def _from_base64(entry, name: str, shape: tuple[int, int, int]) -> torch.Tensor:
    if not isinstance(entry, str):
        raise RequestError(f"{name}: expected a base64 string of a PNG or JPEG file")
    try:
        data = base64.b64decode(entry, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{name}: not valid base64") from None
    return _decode(data, name, shape)


def _from_array(entry, name: str, shape: tuple[int, int, int]) -> torch.Tensor:
    try:
        arr = np.asarray(entry, dtype=np.float32)
    except (ValueError, TypeError):
        raise RequestError(f"{name}: not a rectangular array of numbers") from None
    if arr.ndim == 2 and shape[0] == 1:
        arr = arr[None]
    if tuple(arr.shape) != tuple(shape):
        raise RequestError(f"{name}: shape {tuple(arr.shape)} but the model takes "
                           f"{tuple(shape)} (C, H, W)")
    if not np.isfinite(arr).all() or arr.min() < 0.0 or arr.max() > 1.0:
        raise RequestError(f"{name}: values must be finite and in [0, 1]")
    return torch.from_numpy(np.ascontiguousarray(arr))


def response(results: list[dict]) -> tuple[int, dict]:
    """The HTTP status and JSON body for a request's results (in order): 200 and
    ``{"results": [...]}``, or 500 and the error of the first image that had no result."""
    for res in results:
        if res.get("status") == "error":
            return 500, {"error": res["error"]}
    return 200, {"results": results}


def encode_png_base64(image: torch.Tensor) -> str:
    """(C, H, W) float in [0, 1] -> base64 of its 8-bit PNG (as ``purify`` writes it)."""
    from apudae_engine.images.codec import encode_png, to_uint8

    return base64.b64encode(encode_png(to_uint8(image))).decode("ascii")
