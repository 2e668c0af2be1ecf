"""Loaders: the cpu loader is the policy; DALI (on the CPU here) gives the same tensors and the
same error records, and a corrupt file in a batch never costs the other files."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import apudae_engine.images.loaders as loaders
from apudae_engine.core.errors import BackendUnavailable, UserError
from apudae_engine.images.codec import ImageError, load_image
from apudae_engine.images.loaders import BatchData, get_loader
from apudae_engine.method.config import PurifyConfig

CPU = torch.device("cpu")
LIMIT = 64_000_000


def make_folder(root, seed=0):
    """PNGs in every mode and several sizes, as (paths, kinds)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    sizes = [(28, 28), (32, 32), (41, 23), (19, 30)]
    modes = ["L", "RGB", "P", "RGBA", "LA", "I;16", "1"]
    for i in range(21):
        h, w = sizes[i % len(sizes)]
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        im = Image.fromarray(rgb)
        mode = modes[i % len(modes)]
        if mode == "I;16":
            im = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
        elif mode != "RGB":
            im = im.convert(mode)
        paths.append(root / f"{i:02d}_{mode.replace(';', '')}.png")
        im.save(paths[-1])
    return paths


def add_bad_files(root, good):
    """Bad files that a header check catches, and one it cannot (corrupt compressed data)."""
    data = good.read_bytes()
    corrupt = bytearray(data)
    corrupt[60:90] = bytes(30)  # inside IDAT: the header and the IEND trailer stay valid
    files = {"corrupt.png": bytes(corrupt), "truncated.png": data[: len(data) // 2],
             "empty.png": b"", "text.png": b"not an image at all"}
    for name, content in files.items():
        (root / name).write_bytes(content)
    return [root / name for name in files]


def expected(paths, shape):
    """What the cpu policy gives: uint8 arrays for good files, messages for bad ones."""
    arrays, errors = {}, {}
    for i, p in enumerate(paths):
        try:
            arrays[i] = load_image(p, shape[0], shape[1:], LIMIT)
        except ImageError as exc:
            errors[i] = str(exc)
    return arrays, errors


def check(batch: BatchData, paths, shape):
    arrays, errors = expected(paths, shape)
    assert batch.ok == sorted(arrays)
    assert {i: str(e) for i, e in batch.errors.items()} == errors
    assert batch.images.dtype == torch.float32 and batch.images.shape == (len(arrays), *shape)
    want = torch.from_numpy(np.stack([arrays[i] for i in batch.ok])).float() / 255.0
    assert torch.equal(batch.images, want)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_cpu_loader_is_the_policy_and_records_errors(tmp_path, shape):
    paths = make_folder(tmp_path / "in")
    paths[3:3] = add_bad_files(tmp_path / "in", paths[1])
    with get_loader("cpu", CPU, workers=2) as loader:
        check(loader.load_batch(paths, shape, LIMIT), paths, shape)


def test_cpu_loader_batch_of_only_bad_files(tmp_path):
    bad = add_bad_files(tmp_path, make_folder(tmp_path / "in")[0])
    with get_loader("cpu", CPU) as loader:
        batch = loader.load_batch(bad, (1, 28, 28), LIMIT)
    assert batch.ok == [] and batch.images.shape == (0, 1, 28, 28)
    assert sorted(batch.errors) == [0, 1, 2, 3]


@pytest.fixture
def dali():
    pytest.importorskip("nvidia.dali", reason="DALI not installed: pip install nvidia-dali-cuda130")
    with get_loader("dali", CPU, workers=2) as loader:
        yield loader


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 17, 40)])
def test_dali_gives_the_cpu_loaders_tensors_for_png(dali, tmp_path, shape):
    # Gray <-> RGB conversions, resizes in both directions, and modes that are routed to Pillow.
    paths = make_folder(tmp_path / "in")
    cpu = get_loader("cpu", CPU).load_batch(paths, shape, LIMIT)
    ours = dali.load_batch(paths, shape, LIMIT)
    assert ours.ok == cpu.ok == list(range(len(paths)))
    assert torch.equal(ours.images, cpu.images)


def test_dali_decodes_plain_files_itself(dali, tmp_path, monkeypatch):
    paths = make_folder(tmp_path / "in")
    plain = [p for p in paths if p.stem.endswith(("_L", "_RGB"))]
    pillow_calls = []
    monkeypatch.setattr(loaders, "load_image", lambda p, *a: pillow_calls.append(p))
    batch = dali.load_batch(plain, (3, 28, 28), LIMIT)
    assert pillow_calls == [] and batch.ok == list(range(len(plain)))


def test_dali_corrupt_file_mid_batch_does_not_stop_the_others(dali, tmp_path, monkeypatch):
    paths = make_folder(tmp_path / "in")
    bad = add_bad_files(tmp_path / "in", paths[1])
    paths = paths[:5] + bad[:2] + paths[5:12] + bad[2:] + paths[12:]
    spy = []
    monkeypatch.setattr(loaders, "load_image", lambda p, *a: spy.append(p) or load_image(p, *a))
    batch = dali.load_batch(paths, (1, 28, 28), LIMIT)
    check(batch, paths, (1, 28, 28))  # same tensors and the cpu loader's error messages
    # Only the bad files and the modes DALI does not handle went through Pillow.
    assert set(bad) <= set(spy)
    assert not any(p.stem.endswith(("_L", "_RGB")) for p in spy)
    assert "corrupt.png: cannot decode" in str(batch.errors[5])


def test_dali_jpeg_close_to_pillow(dali, tmp_path):
    rng = np.random.default_rng(3)
    paths = []
    for i in range(12):
        img = rng.integers(0, 256, (30 + i, 28, 3), dtype=np.uint8)
        paths.append(tmp_path / f"{i}.jpg")
        Image.fromarray(img if i % 2 else img[..., 0]).save(paths[-1], quality=70 + 2 * i,
                                                            progressive=i % 3 == 0)
    cpu = get_loader("cpu", CPU).load_batch(paths, (3, 28, 28), LIMIT)
    ours = dali.load_batch(paths, (3, 28, 28), LIMIT)
    assert ours.ok == cpu.ok == list(range(12))
    # DALI's CPU decoder is libjpeg-turbo with Pillow's settings: equal in practice; the bound
    # leaves room for other libjpeg-turbo builds (nvJPEG on a GPU differs more, see docs/purify.md).
    assert (ours.images - cpu.images).abs().max() <= 2 / 255


def test_decompression_bomb_is_refused_by_every_loader(dali, tmp_path):
    Image.new("L", (300, 300)).save(tmp_path / "big.png")
    for loader in (get_loader("cpu", CPU), dali):
        batch = loader.load_batch([tmp_path / "big.png"], (1, 28, 28), 10_000)
        assert batch.ok == [] and "exceeds the limit of 10000" in str(batch.errors[0])


def test_explicit_unavailable_loader_names_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import fails as if not installed
    with pytest.raises(BackendUnavailable, match=r"pip install 'apudae-engine\[dali\]'"):
        get_loader("dali", CPU)
    with pytest.raises(BackendUnavailable, match="CUDA device"):
        get_loader("nvjpeg", CPU)
    with pytest.raises(UserError, match="unknown loader 'pil'"):
        get_loader("pil", CPU)


def test_auto_takes_the_best_usable_loader_and_logs_once(monkeypatch, caplog):
    monkeypatch.setattr(loaders, "_logged", set())
    with caplog.at_level(logging.INFO, logger="apudae_engine.images.loaders"):
        assert get_loader("auto", CPU).name == "cpu"
        assert get_loader("auto", CPU).name == "cpu"
    assert [r.getMessage() for r in caplog.records] == ["loader auto: using cpu on cpu"]
    # On a GPU: DALI first, then nvjpeg, else cpu. Nothing touches CUDA until a batch loads.
    cuda = torch.device("cuda")
    usable = {"dali", "nvjpeg"}
    monkeypatch.setattr(loaders, "loader_unavailable_reason",
                        lambda name, device: None if name in usable else "missing")
    assert get_loader("auto", cuda).name == "dali"
    usable.discard("dali")
    assert get_loader("auto", cuda).name == "nvjpeg"
    usable.clear()
    assert get_loader("auto", cuda).name == "cpu"


def test_purify_folder_writes_the_same_files_with_dali(dali, tiny_model, image_folder, tmp_path):
    from apudae_engine.folder.local import FolderJob, purify_folder

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), np.uint8)).save(
        image_folder / "a" / "rgb.png")  # converted to luminance and resized on the device
    add_bad_files(image_folder / "b", image_folder / "a" / "img0.png")
    results = {}
    for name in ("cpu", "dali"):
        out = tmp_path / name
        summary = purify_folder(FolderJob(image_folder, out, batch_size=4, model=tiny_model,
                                          loader=name, config=PurifyConfig(seed=0)))
        assert (summary.ok, summary.failed) == (11, 4)
        manifest = (out / "manifest.jsonl").read_text().splitlines()
        files = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*.png"))}
        results[name] = manifest, files
    assert results["dali"] == results["cpu"]
