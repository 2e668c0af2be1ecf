"""Serving: the request protocol, the engine against Purifier.purify, and `apudae-engine serve`
on a local Ray (three concurrent requests, one bad image, shut down with nothing left)."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image
from synthetic import make_digits

from apudae_engine.backends.purifier import Purifier
from apudae_engine.method.config import PurifyConfig
from apudae_engine.serve.engine import ServeSettings, ServingEngine
from apudae_engine.serve.requests import RequestError, parse_request

SHAPE = (1, 28, 28)
SEED0 = PurifyConfig(seed=0)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, "L").save(buf, format="PNG")
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _decode_png(b64: str) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(base64.b64decode(b64))), np.int16)


def _expected(purifier: Purifier, arrays: list[np.ndarray], ids=None):
    x = torch.from_numpy(np.stack(arrays)).float().div(255).unsqueeze(1)
    ids = None if ids is None else torch.tensor(ids, dtype=torch.int64)
    res = purifier.purify(x, ids)
    return res, np.rint(res.images.numpy()[:, 0] * 255).astype(np.int16)


# -- the protocol -----------------------------------------------------------------------------


def test_parse_png_body_and_json_forms():
    digits = make_digits(2, seed=3)
    (item,) = parse_request(_png(digits[0]), "image/png", SHAPE)
    assert item.image.shape == SHAPE and item.image_id is None and item.output == "png"
    assert torch.equal(item.image, torch.from_numpy(digits[0]).float().div(255)[None])
    body = json.dumps({"images": [_b64(_png(d)) for d in digits], "ids": [5, 6]}).encode()
    items = parse_request(body, "application/json; charset=utf-8", SHAPE)
    assert [it.image_id for it in items] == [5, 6]
    body = json.dumps({"arrays": [(digits[1] / 255).tolist()], "output": "array"}).encode()
    (item,) = parse_request(body, "application/json", SHAPE)
    assert item.output == "array" and item.image.shape == SHAPE


@pytest.mark.parametrize("body, content_type, message", [
    (b"", "image/png", "body: empty request"),
    (b"not an image", "image/png", "body: not a recognised image format"),
    (b"{", "application/json", "body: not valid JSON"),
    (b'{"images": ["@@"]}', "application/json", "images[0]: not valid base64"),
    (json.dumps({"images": ["aGVsbG8="]}).encode(), "application/json",
     "images[0]: not a recognised image format"),
    (json.dumps({"arrays": [[[0.5] * 3] * 3]}).encode(), "application/json",
     "arrays[0]: shape (1, 3, 3) but the model takes (1, 28, 28)"),
    (json.dumps({"arrays": [[[2.0] * 28] * 28]}).encode(), "application/json",
     "arrays[0]: values must be finite and in [0, 1]"),
    (json.dumps({"arrays": [[[0.0] * 28] * 28], "ids": [-1]}).encode(), "application/json",
     "ids[0]: -1 is not an integer"),
    (json.dumps({"arrays": [[[0.0] * 28] * 28], "output": "jpeg"}).encode(),
     "application/json", "output: 'jpeg' is not one of png, array"),
])
def test_bad_requests_get_one_line_naming_the_input(body, content_type, message):
    with pytest.raises(RequestError) as err:
        parse_request(body, content_type, SHAPE)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_settings_refuse_a_public_host():
    from apudae_engine.core.errors import UserError

    with pytest.raises(UserError, match="loopback only"):
        ServeSettings(host="0.0.0.0")


# -- the engine -------------------------------------------------------------------------------


def test_engine_equals_purifier_and_classifier(tiny_model):
    from apudae_engine.method.checkpoint import load_classifier

    engine = ServingEngine(ServeSettings(model=str(tiny_model), config=SEED0,
                                         backend="reference"))
    digits = list(make_digits(3, seed=4))
    items = parse_request(json.dumps({"images": [_b64(_png(d)) for d in digits],
                                      "ids": [1, 2, 3]}).encode(), "application/json", SHAPE)
    got = engine.purify_items(items)
    ref, expected = _expected(Purifier.from_pretrained(tiny_model, SEED0), digits, [1, 2, 3])
    clf = load_classifier(str(tiny_model)).model
    labels = clf(ref.images).argmax(1).tolist()
    for i, res in enumerate(got):
        assert np.array_equal(_decode_png(res["png"]), expected[i])
        assert res["r_before"] == pytest.approx(float(ref.error_before[i]))
        assert res["active_steps"] == int(ref.active_steps[i])
        assert res["label_after"] == labels[i] and res["class_after"] == f"c{labels[i]}"


# -- the server on a local Ray ----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: bytes, content_type: str) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _cmdline(pid: int) -> str:
    import psutil

    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.NoSuchProcess:
        return ""


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@pytest.mark.slow
def test_serve_command_on_local_ray(tiny_model, tmp_path):
    pytest.importorskip("ray.serve", reason="needs pip install 'apudae-engine[serve]'")
    import psutil  # shipped with Ray (importable once ray is)

    port = _free_port()
    url = f"http://127.0.0.1:{port}/purify"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    server = subprocess.Popen(
        [sys.executable, "-m", "apudae_engine", "serve", "--model", str(tiny_model), "--port",
         str(port), "--max-batch", "8", "--batch-wait", "0.05", "--seed", "0", "--backend",
         "reference"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True, cwd=tmp_path)
    children: set[int] = set()
    try:
        deadline = time.monotonic() + 300
        info = None
        while time.monotonic() < deadline and server.poll() is None:
            children.update(_descendants(server.pid))
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    info = json.loads(resp.read())
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(1)
        assert info is not None, f"server did not come up:\n{server.stdout.read()}"
        assert info["input_shape"] == list(SHAPE) and info["classifier"] is True
        # only loopback: neither the HTTP port nor any of Ray's listens on another address
        children.update(_descendants(server.pid))
        tree = children | {server.pid}
        listening = [c for c in psutil.net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN and c.pid in tree]
        assert any(c.laddr.port == port for c in listening)
        loopback = {"127.0.0.1", "::ffff:127.0.0.1"}
        # Ray Serve 2.60 starts each replica's inter-deployment gRPC server on [::]:0, hard-coded
        # (ray/serve/_private/replica.py); it is the one listener we cannot keep on loopback.
        exposed = [(c.laddr, psutil.Process(c.pid).name()) for c in listening
                   if c.laddr.ip not in loopback and not (
                       c.laddr.ip == "::" and _cmdline(c.pid).startswith("ray::ServeReplica"))]
        assert not exposed, exposed

        digits = list(make_digits(6, seed=7))
        requests = [
            (_png(digits[0]), "image/png"),
            (json.dumps({"images": [_b64(_png(d)) for d in digits[1:4]],
                         "ids": [11, 12, 13]}).encode(), "application/json"),
            (json.dumps({"arrays": [(d / 255).tolist() for d in digits[4:]],
                         "output": "array"}).encode(), "application/json"),
        ]
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda r: _post(url, *r), requests))
        assert [status for status, _ in answers] == [200, 200, 200]
        purifier = Purifier.from_pretrained(tiny_model, SEED0)  # the server ran --seed 0
        _, exp0 = _expected(purifier, digits[:1])
        _, exp1 = _expected(purifier, digits[1:4], [11, 12, 13])
        ref2, _ = _expected(purifier, digits[4:])
        assert np.array_equal(_decode_png(answers[0][1]["results"][0]["png"]), exp0[0])
        for i, res in enumerate(answers[1][1]["results"]):
            assert np.array_equal(_decode_png(res["png"]), exp1[i])
        for i, res in enumerate(answers[2][1]["results"]):
            got = torch.tensor(res["array"])
            torch.testing.assert_close(got, ref2.images[i], atol=1e-6, rtol=0)
            assert res["r_before"] == pytest.approx(float(ref2.error_before[i]), rel=1e-5)
            assert isinstance(res["flagged"], bool) and "label_after" in res

        bad = json.dumps({"images": [_b64(_png(digits[0])), _b64(b"garbage")]}).encode()
        status, doc = _post(url, bad, "application/json")
        assert status == 400
        assert doc == {"error": "images[1]: not a recognised image format"}
        children.update(_descendants(server.pid))
    finally:
        server.send_signal(signal.SIGINT)
        try:
            out, _ = server.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            out, _ = server.communicate()
            pytest.fail(f"the server did not stop on SIGINT:\n{out}")
    assert server.returncode == 0, out
    assert children, "the server started no Ray processes?"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(p) for p in children):
        time.sleep(0.5)
    left = [p for p in children if _alive(p)]
    assert not left, f"processes left behind: {left}"
