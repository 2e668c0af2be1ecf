"""Issue 19: `--reject-flagged` (no purified output for a flagged image, the status `rejected`),
the one batch rule behind purify, the Ray Data callable and serve, and issue 17's `auto`
default backend."""

from __future__ import annotations

import base64
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apudae_engine.backends.purifier import Purifier
from apudae_engine.cli import main
from apudae_engine.cli.main import build_parser
from apudae_engine.core.errors import UserError
from apudae_engine.folder.batch import BatchPurifier
from apudae_engine.folder.local import FolderJob, purify_folder
from apudae_engine.folder.ray_dataset import PurifyBatches, purify_dataset
from apudae_engine.method.config import PurifyConfig
from apudae_engine.serve.engine import ServeSettings


def read_manifest(out: Path) -> dict[str, dict]:
    return {r["path"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text()
                                       .splitlines())}


def outputs(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.rglob("*.png") if p.name != "preview.png"}


def test_flagged_images_are_rejected_without_output_and_stay_rejected(
        tiny_model, image_folder, tmp_path, flag_k, capsys):
    plain, out = tmp_path / "plain", tmp_path / "out"
    args = ["purify", "--input", str(image_folder), "--model", str(tiny_model), "--seed", "0",
            "--flag-k", flag_k, "--batch", "3"]
    assert main([*args, "--output", str(plain)]) == 0
    written = read_manifest(plain)
    flagged = {p for p, r in written.items() if r["flagged"]}
    assert len(flagged) == 5  # without the option a flagged image is written
    assert all(written[p]["status"] == "ok" for p in flagged)
    assert outputs(plain) == {r["output"] for r in written.values()}

    assert main([*args, "--output", str(out), "--reject-flagged"]) == 0  # not a failure
    recs = read_manifest(out)
    assert {p for p, r in recs.items() if r["status"] == "rejected"} == flagged
    for p in flagged:
        rec = recs[p]
        assert rec["flagged"] is True and "output" not in rec and "label_after" not in rec
        assert rec["r_before"] == written[p]["r_before"] and "label_before" in rec
    assert outputs(out) == {written[p]["output"] for p in written if p not in flagged}
    for p in written.keys() - flagged:  # the others are what a plain run writes
        assert recs[p] == written[p]
        assert (out / p).read_bytes() == (plain / p).read_bytes()
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["ok"], summary["rejected"], summary["failed"]) == (10 - len(flagged),
                                                                       len(flagged), 0)
    assert summary["flagged"] == len(flagged) and summary["runs"][0]["rejected"] == len(flagged)
    assert json.loads((out / "run.json").read_text())["reject_flagged"] is True

    # Resume: rejected counts as done and stays rejected; a lost output is redone.
    kept = next(iter(written.keys() - flagged))
    (out / kept).unlink()
    assert main([*args, "--output", str(out), "--reject-flagged"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed"] == 9 and summary["rejected"] == len(flagged)
    assert summary["runs"][-1]["ok"] == 1 and summary["runs"][-1]["rejected"] == 0
    again = read_manifest(out)
    assert {p for p, r in again.items() if r["status"] == "rejected"} == flagged
    assert {p: r for p, r in again.items() if p != kept} == \
        {p: r for p, r in recs.items() if p != kept}
    assert outputs(out) == {written[p]["output"] for p in written if p not in flagged}

    # The option is part of the run: a rerun without it is another run.
    capsys.readouterr()
    assert main([*args, "--output", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--output", str(plain), "--reject-flagged"]) == 2
    # Replacing a plain run removes the rejected images' earlier outputs.
    assert main([*args, "--output", str(plain), "--reject-flagged", "--overwrite"]) == 0
    assert outputs(plain) == outputs(out)


def test_reject_flagged_needs_a_threshold(tiny_model):
    dae = Purifier.from_pretrained(tiny_model).dae
    purifier = Purifier(dae, None, None, PurifyConfig(method="iterative", seed=0))
    assert purifier.flag_threshold() is None  # an uncalibrated DAE flags nothing
    with pytest.raises(UserError, match="--reject-flagged needs a flag threshold"):
        BatchPurifier(purifier, reject_flagged=True)
    BatchPurifier(purifier)  # without the option it runs and flags nothing


def test_one_rule_for_nan_in_the_ray_callable_and_serve(tiny_model, poison_result):
    from apudae_engine.serve.engine import ServingEngine
    from apudae_engine.serve.requests import Item, response

    engine = ServingEngine(ServeSettings(model=str(tiny_model), config=PurifyConfig(seed=0),
                                         backend="reference"))
    fn = PurifyBatches(tiny_model, PurifyConfig(seed=0), backend="reference")
    poison_result(1, float("inf"))  # the second image of each batch
    images = np.zeros((3, 28, 28), np.uint8)
    images[:, 10:18, 10:18] = 200
    rows = fn({"image": images, "path": np.array(["x.png", "y.png", "z.png"], object)})
    assert list(rows["status"]) == ["ok", "error", "ok"]
    assert rows["error"][1] == "y.png: purified result holds NaN or Inf (check the model's " \
        "weights and calibration)"
    assert not rows["image"][1].any() and rows["label_after"][1] == -1
    items = [Item(torch.from_numpy(a).float()[None] / 255, i, "png", f"images[{i}]")
             for i, a in enumerate(images)]
    results = engine.purify_items(items)
    assert [r["status"] for r in results] == ["ok", "error", "ok"]
    assert "png" not in results[1]
    status, doc = response(results)
    assert status == 500 and doc == {"error": "images[1]: purified result holds NaN or Inf "
                                              "(check the model's weights and calibration)"}
    assert response([results[0]]) == (200, {"results": [results[0]]})


def test_ray_callable_and_serve_reject_what_purify_rejects(tiny_model, image_folder, tmp_path,
                                                          flag_k):
    from apudae_engine.serve.engine import ServingEngine
    from apudae_engine.serve.requests import parse_request, response

    config = PurifyConfig(seed=0, flag_k=float(flag_k))
    out = tmp_path / "out"
    purify_folder(FolderJob(image_folder, out, model=tiny_model, config=config,
                            reject_flagged=True))
    recs = read_manifest(out)
    files = sorted(image_folder.rglob("*.png"))
    rels = [str(f.relative_to(image_folder)) for f in files]
    fn = PurifyBatches(tiny_model, config, backend="reference", root=image_folder,
                       reject_flagged=True)
    rows = fn({"image": np.stack([np.array(Image.open(f)) for f in files]),
               "path": np.array([str(f) for f in files], object)})
    assert list(rows["status"]) == [recs[r]["status"] for r in rels]
    for i, rel in enumerate(rels):
        rejected = recs[rel]["status"] == "rejected"
        assert rows["flagged"][i] == recs[rel]["flagged"]
        assert rows["image"][i].any() != rejected
        assert (rows["label_after"][i] == -1) == rejected
        assert (rows["class_after"][i] == "") == rejected

    engine = ServingEngine(ServeSettings(model=str(tiny_model), config=config,
                                         backend="reference", reject_flagged=True))
    body = json.dumps({"images": [base64.b64encode(f.read_bytes()).decode() for f in files],
                       "ids": [0] * len(files)}).encode()
    results = engine.purify_items(parse_request(body, "application/json", (1, 28, 28)))
    for res in results:  # the rule on r_before: the ids change the noise, not the decision
        if res["status"] == "rejected":
            assert res["flagged"] and "png" not in res and "label_after" not in res
            assert "label_before" in res and "class_before" in res
        else:
            assert res["status"] == "ok" and not res["flagged"] and "png" in res
    assert [r["status"] for r in results] == [recs[r]["status"] for r in rels]
    assert response(results) == (200, {"results": results})  # not an error for the request


def test_auto_is_the_default_backend():
    parser = build_parser()
    for argv in (["purify", "--input", "x"], ["purify-ray", "--input", "x"], ["serve"]):
        assert parser.parse_args(argv).backend == "auto", argv
    assert FolderJob("x").backend == "auto"
    assert ServeSettings().backend == "auto"
    for fn in (purify_dataset, PurifyBatches):
        assert inspect.signature(fn).parameters["backend"].default == "auto"
