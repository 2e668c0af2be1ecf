"""Options shared by several sub-commands; building them imports nothing heavy."""

from __future__ import annotations

import argparse

from apudae_engine.core.choices import BACKEND_CHOICES, METHODS, PRECISIONS


def add_purify_options(p: argparse.ArgumentParser) -> None:
    """The purification settings shared by purify, purify-ray, verify and serve."""
    g = p.add_argument_group("purification")
    g.add_argument("--model", default="fmnist", help="bundled model name or DAE checkpoint path "
                   "(default: fmnist)")
    g.add_argument("--method", choices=METHODS, default="adaptive")
    add_tunable_options(g)
    g.add_argument("--no-noise", action="store_true", help="turn the adaptive noise off "
                   "(deterministic)")
    g.add_argument("--seed", type=int, default=None, help="noise seed; default: a secret "
                   "random seed per run, recorded in the output's run.json and reused when the "
                   "run resumes (give one for reproducible results)")
    g.add_argument("--compat", action="store_true", help="reproduce the authors' code: sigma "
                   "0.5 and no clipping to [0, 1]")
    flag = g.add_mutually_exclusive_group()
    flag.add_argument("--flag-fpr", type=float, default=None, metavar="RATE", help="flag an "
                      "image as likely adversarial when its error exceeds the threshold that "
                      "this share of clean calibration images exceeds (default: the model's, "
                      "0.05)")
    flag.add_argument("--flag-k", type=float, default=None, help="flag when the error exceeds "
                      "mu + k*sigma instead")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    g.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                   help="auto (default: compiled where it can run, else "
                   "reference; folder jobs under 1,000 images in fp32 run the reference, "
                   "compiling would not pay), reference (eager autograd, the specification), "
                   "compiled (torch.compile) or tensorrt (CUDA); see `apudae-engine verify`")
    g.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="convolution precision of the compiled/tensorrt backends (default fp32; "
                   "bf16/fp16 are checked against fp32 on the first batch)")


def add_reject_option(p: argparse.ArgumentParser, where: str) -> None:
    """``--reject-flagged`` for the commands that give images out (purify, purify-ray, serve);
    ``where`` says where the status shows."""
    p.add_argument("--reject-flagged", action="store_true", help="give no purified image for "
                   "an image flagged as likely adversarial (see --flag-fpr) but the status "
                   f"'rejected' in {where} (default: purify and output every image)")


def add_model_data_options(p: argparse.ArgumentParser, dataset_note: str = "") -> None:
    """The DAE, its classifier and the dataset, as evaluate and tune take them."""
    p.add_argument("--model", default="fmnist", help="bundled model name or DAE checkpoint path")
    p.add_argument("--classifier", default=None, help="classifier checkpoint (default: the one "
                   "beside the DAE)")
    p.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist, mnist, cifar10 or "
                   "folder:PATH" + dataset_note)
    p.add_argument("--data-dir", default=None)


def add_tunable_options(g) -> None:
    """The settings ``apudae-engine tune`` chooses; unset, they come from the model."""
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the "
                   "model's tuned value, else 13 adaptive, 12 iterative)")
    g.add_argument("--lr", type=float, default=None, help="Adam step size (default: the "
                   "model's tuned value, else 2/255 adaptive, 1/255 iterative)")
    g.add_argument("--noise-eps", type=float, default=None, help="eps_n, the noise unit "
                   "(default: the model's tuned value, else 0.7/255)")
    g.add_argument("--noise-cap", type=float, default=None, dest="noise_max_scale",
                   help="upper clip of the noise scale ((r - mu) / 2 sigma)^2 (default: the "
                   "model's tuned value, else 4)")
    g.add_argument("--method-defaults", action="store_true", help="ignore the model's tuned "
                   "settings (purify_defaults, from `apudae-engine tune`) and use the "
                   "method's own (docs/method.md)")


def tunable_settings(a: argparse.Namespace) -> dict:
    """``add_tunable_options``' arguments as ``PurifyConfig`` keywords."""
    return dict(steps=a.steps, lr=a.lr, noise_eps=a.noise_eps,
                noise_max_scale=a.noise_max_scale,
                defaults="method" if a.method_defaults else "model")


def purify_config(a: argparse.Namespace):
    """The ``PurifyConfig`` that ``add_purify_options``' arguments describe (a ``Purifier``
    built from the model fills the unset settings from its tuned defaults)."""
    from apudae_engine.method.config import PurifyConfig

    kw = dict(method=a.method, noise=not a.no_noise, seed=a.seed, flag_k=a.flag_k,
              flag_fpr=a.flag_fpr, **tunable_settings(a))
    return PurifyConfig.compat(**kw) if a.compat else PurifyConfig(**kw)
