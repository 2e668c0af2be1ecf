"""Options shared by several sub-commands; building them imports nothing heavy."""

from __future__ import annotations

import argparse


def add_purify_options(p: argparse.ArgumentParser) -> None:
    """The purification settings shared by purify, purify-ray, verify and serve."""
    g = p.add_argument_group("purification")
    g.add_argument("--model", default="fmnist", help="bundled model name or DAE checkpoint path "
                   "(default: fmnist)")
    g.add_argument("--method", choices=("adaptive", "iterative", "direct"), default="adaptive")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 13 "
                   "adaptive, 12 iterative)")
    g.add_argument("--lr", type=float, default=None, help="Adam step size (default: 2/255 "
                   "adaptive, 1/255 iterative)")
    g.add_argument("--noise-eps", type=float, default=0.7 / 255, help="eps_n (default 0.7/255)")
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
    g.add_argument("--backend", default="reference", choices=("reference", "compiled",
                   "tensorrt", "auto"), help="reference (default, eager autograd), compiled "
                   "(torch.compile), tensorrt (CUDA) or auto; see `apudae-engine verify`")
    g.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="convolution precision of the compiled/tensorrt backends (default fp32; "
                   "bf16/fp16 are checked against fp32 on the first batch)")


def purify_config(a: argparse.Namespace):
    """The ``PurifyConfig`` that ``add_purify_options``' arguments describe."""
    from apudae_engine.method.config import PurifyConfig

    kw = dict(method=a.method, steps=a.steps, lr=a.lr, noise=not a.no_noise,
              noise_eps=a.noise_eps, seed=a.seed, flag_k=a.flag_k,
              flag_fpr=a.flag_fpr)
    return PurifyConfig.compat(**kw) if a.compat else PurifyConfig(**kw)
