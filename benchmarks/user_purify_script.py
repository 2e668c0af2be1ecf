"""The script a user would write instead of ``apudae-engine purify``: the baseline of
``bench_purify_cli.py``. Pillow decodes, the authors' loop (``torch.optim.Adam`` on delta, the
hinge loss, noise from torch's generator) purifies batches of 16, Pillow writes PNGs. Same
model and settings as ``purify`` (the bundled DAE, its mu, sigma and tuned steps, lr, noise).

Usage: python benchmarks/user_purify_script.py INPUT_DIR OUTPUT_DIR
"""

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from apudae_engine import Purifier

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir(parents=True, exist_ok=True)
p = Purifier.from_pretrained("fmnist")
dae, mu, sigma, c = p.dae, p.mu, p.sigma, p.config
files = sorted(src.glob("*.png"))
for i in range(0, len(files), 16):
    batch = files[i:i + 16]
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("L"), np.float32) / 255)
                     for f in batch]).unsqueeze(1)
    delta = torch.zeros_like(x, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=c.lr)
    big_x = x.clone()
    for _ in range(c.steps):
        y = big_x + delta
        r = ((y - dae(y)) ** 2).sum(dim=(1, 2, 3))
        with torch.no_grad():
            amp = c.noise_eps * (((r - mu) / (2 * sigma)) ** 2).clamp(0, c.noise_max_scale)
            big_x = big_x + amp.view(-1, 1, 1, 1) * (2 * torch.rand_like(x) - 1)
        loss = (torch.clamp(r - mu, min=0) ** 2).sum() / sigma**2
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = (big_x + delta).detach().clamp(0, 1)
    for f, img in zip(batch, out):
        Image.fromarray((img[0].numpy() * 255).round().astype(np.uint8)).save(dst / f.name)
