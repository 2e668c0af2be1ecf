"""How far each loader's JPEG decoding is from Pillow's (libjpeg-turbo), the cpu policy.

PNG is lossless, so every loader gives identical tensors (tests/engine/images/test_loaders.py). JPEG
decoders may differ in IDCT and chroma upsampling; this measures it on generated JPEGs over
qualities, chroma subsamplings, progressive coding, gray and colour, several sizes, at each
file's own size (no resize), in 8-bit units.

    python benchmarks/jpeg_decoder_diff.py [--loaders dali nvjpeg] [--device cuda]
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
from pathlib import Path

import torch
from PIL import Image

from apudae_engine.core.host import resolve_device
from apudae_engine.images.loaders import get_loader, loader_unavailable_reason
from apudae_engine.perf.bench_e2e import machine, smooth_images


def make_set(folder: Path) -> list[tuple[Path, dict]]:
    """JPEGs over quality x subsampling x progressive x size x gray/colour."""
    files = []
    sizes = [28, 32, 224, 480]
    combos = itertools.product([50, 75, 90, 95], [0, 1, 2], [False, True], sizes, [1, 3])
    for k, (q, sub, prog, size, ch) in enumerate(combos):
        if ch == 1 and sub:
            continue  # subsampling does not apply to gray images
        img = smooth_images(1, size, ch, seed=k)[0]
        path = folder / f"{k:04d}.jpg"
        Image.fromarray(img[..., 0] if ch == 1 else img).save(
            path, quality=q, subsampling=sub, progressive=prog)
        files.append((path, {"quality": q, "subsampling": ["4:4:4", "4:2:2", "4:2:0"][sub],
                             "progressive": prog, "size": size, "channels": ch}))
    return files


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loaders", nargs="+", default=["dali", "nvjpeg"])
    p.add_argument("--device", default="auto")
    a = p.parse_args()
    device = resolve_device(a.device)
    with tempfile.TemporaryDirectory() as tmp:
        files = make_set(Path(tmp))
        cpu = get_loader("cpu", "cpu")
        for name in a.loaders:
            reason = loader_unavailable_reason(name, device)
            if reason:
                print(f"{name}: skipped ({reason})")
                continue
            loader = get_loader(name, device)
            diffs, worst = [], None
            for path, meta in files:
                with Image.open(path) as im:
                    shape = (3, im.height, im.width)
                ref = cpu.load_batch([path], shape, 10**9).images
                got = loader.load_batch([path], shape, 10**9).images.cpu()
                d = (got - ref).abs().mul(255).round()
                diffs.append(d.flatten())
                if worst is None or d.max() > worst[0]:
                    worst = (float(d.max()), meta)
            every = torch.cat(diffs)
            print(json.dumps({"loader": name, "device": str(device), "files": len(files),
                              "pixels": every.numel(), "max_abs_diff_u8": float(every.max()),
                              "mean_abs_diff_u8": round(float(every.mean()), 5),
                              "share_of_values_differing": round(float((every > 0).float()
                                                                       .mean()), 5),
                              "worst_file": worst[1], "machine": machine()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
