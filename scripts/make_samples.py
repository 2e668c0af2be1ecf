"""Write the bundled demo images: Fashion-MNIST test images, clean and PGD-attacked.

    python scripts/make_samples.py            # -> engine/samples/{clean,adversarial}/*.png

The adversarial half is crafted on the bare bundled classifier (oblivious PGD, L-inf eps 0.1,
20 steps of 0.01 from a random start), so `purify` on the samples shows flagged images. The
committed samples were made with torchattacks 3.5.1's PGD, which the project no longer
installs; the PGD below is the same algorithm, so a rerun gives equivalent, not identical,
images (the random start draws differently).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from apudae_engine.core.files import write_atomic
from apudae_engine.images.codec import encode_png, to_uint8
from apudae_engine.images.datasets import load_dataset
from apudae_engine.method.checkpoint import load_checkpoint


def pgd(clf: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float,
        steps: int) -> torch.Tensor:
    """L-inf PGD (Madry et al.) from a uniform random start, cross-entropy, images in [0, 1]."""
    adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(clf(adv), y)
        (grad,) = torch.autograd.grad(loss, adv)
        adv = adv.detach() + alpha * grad.sign()
        adv = torch.min(torch.max(adv, x - eps), x + eps).clamp(0, 1)
    return adv.detach()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="fmnist")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "engine/samples"))
    ap.add_argument("--count", type=int, default=12)
    args = ap.parse_args()
    clf = load_checkpoint(args.model, "classifier").model
    test = load_dataset("fashion-mnist", "test")
    # Images 0..count-1 stay clean; the next count images are attacked.
    clean = test.float_images()[: 2 * args.count]
    labels = test.labels[: 2 * args.count]
    torch.manual_seed(0)
    adv = pgd(clf, clean[args.count:], labels[args.count:], eps=0.1, alpha=0.01, steps=20)
    out = Path(args.out)
    for kind, imgs, offset in (("clean", clean[: args.count], 0),
                               ("adversarial", adv, args.count)):
        for i, img in enumerate(imgs):
            idx = offset + i
            name = f"{idx:04d}_{test.classes[labels[idx]].replace('/', '-').replace(' ', '-')}.png"
            write_atomic(out / kind / name, encode_png(to_uint8(img)))
    with torch.no_grad():
        acc_clean = (clf(clean[: args.count]).argmax(1) == labels[: args.count]).float().mean()
        acc_adv = (clf(adv).argmax(1) == labels[args.count:]).float().mean()
    print(f"wrote {2 * args.count} images to {out}: classifier accuracy clean {acc_clean:.2f}, "
          f"adversarial {acc_adv:.2f}")


if __name__ == "__main__":
    main()
