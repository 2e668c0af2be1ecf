"""The ``apudae-engine`` command line. It parses arguments and calls library functions only.

``--version`` and ``--help`` import nothing heavy (torch is imported by the subcommands).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from apudae_engine._version import __version__
from apudae_engine.cli.options import add_purify_options, add_reject_option, purify_config
from apudae_engine.core.choices import CLASSIFIER_ARCHS, LOADER_CHOICES

log = logging.getLogger("apudae_engine")


def _check_purify_usage(a: argparse.Namespace) -> None:
    """The usage errors that need no torch, raised before it loads (seconds on a cold start);
    the library checks the same again for its own callers."""
    from pathlib import Path

    from apudae_engine.core.errors import UserError

    for flag, value, least in (("--batch", a.batch, 1), ("--workers", a.workers, 1),
                               ("--threads", a.threads, 1), ("--preview", a.preview, 0),
                               ("--verify-every", a.verify_every, 0)):
        if value is not None and value < least:
            raise UserError(f"{flag} must be at least {least}, got {value}")
    if not Path(a.input).exists():
        raise UserError(f"input folder {a.input} does not exist")
    if not Path(a.input).is_dir():
        raise UserError(f"input {a.input} is not a folder")


def _cmd_purify(a: argparse.Namespace) -> int:
    _check_purify_usage(a)
    from apudae_engine.folder.local import FolderJob, purify_folder

    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    job = FolderJob(input_dir=a.input, output_dir=a.output, batch_size=a.batch, model=a.model,
                    classifier=a.classifier, config=purify_config(a), device=a.device,
                    backend=a.backend, precision=a.precision, verify_every=a.verify_every,
                    overwrite=a.overwrite, preview=a.preview,
                    max_pixels=a.max_pixels, workers=a.workers, loader=a.loader,
                    follow_symlinks=a.follow_symlinks, reject_flagged=a.reject_flagged)
    summary = purify_folder(job)
    return 0 if summary.failed == 0 else 1


def _train_config(a: argparse.Namespace):
    from apudae_engine.training.train import TrainConfig

    return TrainConfig(dataset=a.dataset, epochs=a.epochs, batch_size=a.batch, lr=a.lr,
                       seed=a.seed, limit=a.limit, data_dir=a.data_dir)


def _cmd_train_dae(a: argparse.Namespace) -> int:
    from apudae_engine.training.train import train_dae

    m = train_dae(_train_config(a), a.out, layers=a.layers, width=a.width,
                  noise_std=a.noise_std)
    print(f"denoise PSNR on held-out data: {m['denoise_psnr_db']:.2f} dB -> {a.out}.json")
    return 0


def _cmd_train_classifier(a: argparse.Namespace) -> int:
    from apudae_engine.training.train import train_classifier

    m = train_classifier(_train_config(a), a.out, arch=a.arch, augment=a.augment)
    print(f"test accuracy {m['test_accuracy']:.4f} ({m['test_data']}) -> {a.out}.json")
    return 0


def _cmd_calibrate(a: argparse.Namespace) -> int:
    from apudae_engine.training.calibration import calibrate

    s = calibrate(a.model, a.dataset, limit=a.limit, data_dir=a.data_dir)
    print(f"mu={s['mu']:.4f} sigma={s['sigma']:.4f} from {s['n']} images of {s['data']}")
    return 0


def _dataset_options(p: argparse.ArgumentParser, default: str = "fashion-mnist") -> None:
    p.add_argument("--dataset", default=default, help="fashion-mnist, mnist, cifar10 or "
                   "folder:PATH")
    p.add_argument("--data-dir", default=None, help="dataset location (overrides the default "
                   "and the APUDAE_*_DIR variables)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images")


def _train_options(p: argparse.ArgumentParser, epochs: int) -> None:
    _dataset_options(p)
    p.add_argument("--out", required=True, help="checkpoint path stem (writes .json, "
                   ".safetensors, .log)")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apudae-engine",
        description="Adversarial purification of images with adaptive denoising autoencoders.")
    parser.add_argument("--version", action="version", version=f"apudae-engine {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("purify", help="purify a folder of images")
    p.add_argument("--input", required=True, help="folder of images (searched recursively)")
    p.add_argument("--output", default=None, help="output folder (default: INPUT_purified "
                   "beside the input)")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--classifier", default=None, help="classifier name or path; labels before "
                   "and after go in the manifest ('none' to skip; default: the bundled model's)")
    p.add_argument("--overwrite", action="store_true", help="replace results of a different "
                   "earlier run in the output folder")
    p.add_argument("--preview", type=int, default=0, metavar="N", help="write preview.png, a "
                   "grid of N images: input | purified | amplified difference")
    p.add_argument("--max-pixels", type=int, default=64_000_000, help="refuse images larger than "
                   "this (decompression bombs)")
    p.add_argument("--follow-symlinks", action="store_true", help="read links that point "
                   "outside the input folder (default: an error record for each)")
    p.add_argument("--workers", type=int, default=2, help="decode/encode threads")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for purifying "
                   "(default: torch's)")
    p.add_argument("--loader", default="auto", choices=LOADER_CHOICES,
                   help="image decoder: cpu (Pillow threads), dali (pip install "
                   "'apudae-engine[dali]'), nvjpeg (torchvision on a GPU); auto (default) takes "
                   "dali, then nvjpeg, on a GPU and cpu otherwise")
    p.add_argument("--verify-every", type=int, default=0, metavar="N", help="rerun the "
                   "reference on every N-th batch and log the max pixel difference (0: never)")
    add_reject_option(p, "its manifest record")
    add_purify_options(p)
    p.set_defaults(func=_cmd_purify)

    p = sub.add_parser("train-dae", help="train a denoising autoencoder")
    _train_options(p, epochs=6)
    p.add_argument("--layers", type=int, default=4, help="conv blocks a side (15 = REDNet-30)")
    p.add_argument("--width", type=int, default=48)
    p.add_argument("--noise-std", type=float, default=0.2)
    p.set_defaults(func=_cmd_train_dae)

    p = sub.add_parser("train-classifier", help="train a classifier")
    _train_options(p, epochs=8)
    p.add_argument("--arch", choices=CLASSIFIER_ARCHS, default=CLASSIFIER_ARCHS[0])
    p.add_argument("--augment", action="store_true", help="flips and shifts (colour data)")
    p.set_defaults(func=_cmd_train_classifier)

    p = sub.add_parser("calibrate", help="compute mu/sigma on the held-out calib split")
    p.add_argument("--model", required=True, help="DAE checkpoint (name or path)")
    _dataset_options(p)
    p.set_defaults(func=_cmd_calibrate)

    for extra in _extra_commands():
        extra(sub)
    return parser


def _extra_commands() -> list[Callable[[argparse._SubParsersAction], None]]:
    """Sub-commands defined in other modules (evaluate, verify, bench, export)."""
    from apudae_engine.cli import evaluate, ray, serve, tools, tune

    return [evaluate.register, tune.register, *tools.REGISTER, ray.register, serve.register]


def main(argv: list[str] | None = None) -> int:
    # Decoding and writing threads run beside the purifying thread; libgomp's default spinning
    # then makes every OpenMP team wait on busy cores (10x slower on 2 cores). Must be set before
    # torch loads its OpenMP runtime; a user's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from apudae_engine.core.errors import UserError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(message)s", stream=sys.stderr)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
