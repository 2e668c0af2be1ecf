"""The ``export``, ``verify`` and ``bench`` sub-commands (argument parsing only).

Each ``register_*`` function adds its parser to the CLI (collected by ``cli.main``);
the work is done by ``export.py``, ``verify.py`` and ``bench.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from apudae_engine.core.choices import PRECISIONS

log = logging.getLogger(__name__)


def _device(name: str):
    from apudae_engine.core.host import resolve_device

    return resolve_device(name)


def _load_dae(model: str):
    from apudae_engine.method.checkpoint import load_checkpoint

    ck = load_checkpoint(model, "dae")
    cal = ck.calibration or {}
    return ck, cal.get("mu"), cal.get("sigma")


# -- export -----------------------------------------------------------------------------------


def register_export(sub: argparse._SubParsersAction) -> None:
    from apudae_engine.cli.options import add_tunable_options

    p = sub.add_parser("export", help="export the step graph (r and dr/dy), or with --whole "
                       "the complete purification, to .pt2 and ONNX",
                       description="Write OUT.pt2 (torch.export), OUT.onnx and OUT.json (model "
                       "hash, mu, sigma, input shape) for the DAE's forward-only step graph, or "
                       "with --whole for the complete adaptive purification, with a dynamic "
                       "batch dimension.")
    p.add_argument("--model", default="fmnist", help="bundled model name or DAE checkpoint path")
    p.add_argument("--out", required=True, help="output path stem (writes .pt2, .onnx, .json)")
    p.add_argument("--max-batch", type=int, default=4096, help="largest batch the graph takes")
    p.add_argument("--no-onnx", action="store_true", help="write the .pt2 program only")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    w = p.add_argument_group("whole purification (--whole)")
    w.add_argument("--whole", action="store_true", help="export the complete adaptive "
                   "purification (noise, hinge, Adam, clip, every step) instead of one step: "
                   "images [, image_ids, seed] -> purified, r_before, r_after, active_steps, "
                   "flagged")
    w.add_argument("--aoti", action="store_true", help="also compile OUT.aoti.pt2, the "
                   "AOTInductor package the C++ runner loads (needs a C++ compiler; minutes)")
    w.add_argument("--with-classifier", nargs="?", const="default", default=None,
                   metavar="CLASSIFIER", help="append the classifier (the bundled model's, or "
                   "a name or path) so the graph also outputs logits")
    add_tunable_options(w)
    w.add_argument("--no-noise", action="store_true", help="no adaptive noise (deterministic)")
    w.add_argument("--seed", type=int, default=None, help="default of the graph's seed input "
                   "(default: a secret random seed, recorded in the sidecar)")
    w.add_argument("--compat", action="store_true", help="the authors' code: sigma 0.5, no "
                   "clipping")
    flag = w.add_mutually_exclusive_group()
    flag.add_argument("--flag-fpr", type=float, default=None, metavar="RATE", help="flag at this "
                      "false-positive rate on clean calibration data (default: the model's)")
    flag.add_argument("--flag-k", type=float, default=None, help="flag when r_before > mu + "
                      "k*sigma instead")
    p.set_defaults(func=_cmd_export)


def _cmd_export(a: argparse.Namespace) -> int:
    from apudae_engine.backends.export import export_step
    from apudae_engine.core.errors import UserError

    if a.max_batch < 1:
        raise UserError(f"--max-batch must be at least 1, got {a.max_batch}")
    if a.aoti and not a.whole:
        raise UserError("--aoti compiles the whole purification for the C++ runner; add --whole")
    ck, mu, sigma = _load_dae(a.model)
    stem = Path(a.out)
    if stem.suffix in (".pt2", ".onnx", ".json"):
        stem = stem.with_suffix("")
    if a.whole:
        return _export_whole(a, ck, mu, sigma, stem)
    paths = export_step(ck.model, ck.input_shape, stem, mu=mu, sigma=sigma,
                        max_batch=a.max_batch, onnx=not a.no_onnx, opset=a.opset,
                        source={"checkpoint": str(ck.path), "weights_sha256": ck.weights_sha256})
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def _export_whole(a: argparse.Namespace, ck, mu, sigma, stem: Path) -> int:
    from apudae_engine.backends.export import export_whole
    from apudae_engine.backends.purifier import Purifier
    from apudae_engine.cli.options import tunable_settings
    from apudae_engine.core.errors import UserError
    from apudae_engine.method.checkpoint import load_classifier
    from apudae_engine.method.config import PurifyConfig

    if mu is None or sigma is None:
        raise UserError(f"{a.model}: the DAE has no calibration; run `apudae-engine calibrate`")
    kw = dict(noise=not a.no_noise, seed=a.seed, **tunable_settings(a))
    kw.update({k: v for k, v in (("flag_k", a.flag_k), ("flag_fpr", a.flag_fpr)) if v is not None})
    try:
        config = PurifyConfig.compat(**kw) if a.compat else PurifyConfig(**kw)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    purifier = Purifier(ck.model, mu, sigma, config, checkpoint=ck)
    config = purifier.config.with_(seed=a.seed)  # the model's tuned settings filled in
    threshold = purifier.flag_threshold()
    source = {"checkpoint": str(ck.path), "weights_sha256": ck.weights_sha256}
    classifier = None
    if a.with_classifier:
        spec = None if a.with_classifier == "default" else a.with_classifier
        clf = load_classifier(a.model, spec)
        if clf is None:
            raise UserError(f"{a.model} has no default classifier; pass --with-classifier PATH")
        classifier = clf.model
        source.update(classifier=str(clf.path), classifier_weights_sha256=clf.weights_sha256,
                      labels=clf.meta.get("labels"))
    log.info("exporting the whole purification (%d steps, noise %s); the ONNX translation "
             "takes a few minutes", config.steps, "on" if config.noise else "off")
    paths = export_whole(ck.model, ck.input_shape, stem, mu, sigma, config, threshold, classifier,
                         a.max_batch, onnx=not a.no_onnx, opset=a.opset, source=source)
    if a.aoti:
        from apudae_engine.backends.aoti import package_whole

        paths["aoti"] = package_whole(paths["json"])
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


# -- verify -----------------------------------------------------------------------------------


def register_verify(sub: argparse._SubParsersAction) -> None:
    from apudae_engine.cli.options import add_purify_options

    p = sub.add_parser("verify", help="compare a backend with the reference on the same images",
                       description="Purify the same images with the reference and with "
                       "--backend; print max/mean pixel difference, reconstruction-error "
                       "difference and label agreement. Exit status 1 when beyond tolerance.")
    src = p.add_argument_group("images (a dataset split, or --input)")
    src.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist, mnist, cifar10 "
                     "or folder:PATH (default fashion-mnist)")
    src.add_argument("--split", default="test", choices=("train", "calib", "test"))
    src.add_argument("--data-dir", default=None)
    src.add_argument("--input", default=None, help="a folder of images instead of a dataset")
    src.add_argument("--limit", type=int, default=512, help="first N images (default 512)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--classifier", default=None, help="classifier for label agreement (default: "
                   "the bundled model's; 'none' to skip)")
    p.add_argument("--max-diff", type=float, default=None, help="tolerated max pixel difference")
    p.add_argument("--mean-diff", type=float, default=None, help="tolerated mean pixel "
                   "difference")
    p.add_argument("--min-agreement", type=float, default=None, help="required label agreement")
    p.add_argument("--json", default=None, help="also write the report to this JSON file")
    add_purify_options(p)
    p.set_defaults(func=_cmd_verify, backend="auto")


def _classifier(spec: str | None, model: str, device):
    from apudae_engine.method.checkpoint import load_classifier

    ckpt = load_classifier(model, spec, device)
    return None if ckpt is None else ckpt.model


def _cmd_verify(a: argparse.Namespace) -> int:
    from apudae_engine.cli.options import purify_config
    from apudae_engine.core.errors import UserError
    from apudae_engine.perf.verify import folder_images, verify_backend

    device = _device(a.device)
    ck, mu, sigma = _load_dae(a.model)
    config = purify_config(a).with_model_defaults(ck.purify_defaults)
    if config.method == "adaptive" and (mu is None or sigma is None):
        raise UserError(f"{a.model}: the DAE has no calibration; run `apudae-engine calibrate`")
    if a.input:
        images = folder_images(a.input, ck.input_shape, a.limit)
        source = a.input
    else:
        from apudae_engine.images.datasets import load_dataset

        images = load_dataset(a.dataset, a.split, a.data_dir,
                              ck.input_shape).subset(a.limit).float_images()
        source = f"{a.dataset} {a.split}"
    if tuple(images.shape[1:]) != tuple(ck.input_shape):
        raise UserError(f"images of {source} are {tuple(images.shape[1:])} but the DAE takes "
                        f"{tuple(ck.input_shape)}")
    tolerances = {k: v for k, v in (("max_abs_diff", a.max_diff), ("mean_abs_diff", a.mean_diff),
                                    ("label_agreement", a.min_agreement)) if v is not None}
    rep = verify_backend(ck.model, images, mu, sigma, config, a.backend, a.precision, device,
                         _classifier(a.classifier, a.model, device), a.batch, tolerances)
    agreement = "n/a (no classifier)" if rep.label_agreement is None else \
        f"{rep.label_agreement:.4f}"
    print(f"{rep.backend} ({rep.precision}) vs reference on {rep.images} images of {source}:\n"
          f"  max pixel diff     {rep.max_abs_diff:.3e}\n"
          f"  mean pixel diff    {rep.mean_abs_diff:.3e}\n"
          f"  pixels off > 1/255 {rep.frac_over_1_255:.2e}\n"
          f"  r before max diff  {rep.error_before_max_diff:.3e}\n"
          f"  r after max diff   {rep.error_after_max_diff:.3e}\n"
          f"  label agreement    {agreement}\n"
          f"  seconds            " + ", ".join(f"{k} {v:.2f}" for k, v in rep.seconds.items()))
    if a.json:
        Path(a.json).write_text(json.dumps({"source": source, **rep.to_dict()}, indent=2) + "\n")
    if not rep.passed:
        print("FAILED: " + "; ".join(rep.failures))
        return 1
    print("ok: within tolerance")
    return 0


# -- bench ------------------------------------------------------------------------------------


def register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="images/s of the purification backends",
                       description="Time the adaptive purification loop per backend, batch and "
                       "image size against the reference in the same run; write a JSON record "
                       "to the per-user results folder (see --out).")
    p.add_argument("--cases", default=None, help="comma-separated: fmnist, fmnist-perturbed, "
                   "rednet30-32, rednet30-224 (default: all but rednet30-224, which runs on "
                   "CUDA or with --heavy)")
    p.add_argument("--batch", default=None, help="comma-separated batch sizes for every case "
                   "(default: per case, e.g. 1,64,512 for fmnist)")
    p.add_argument("--backends", default=None, help="comma-separated NAME[:PRECISION], e.g. "
                   "compiled,compiled:bf16 (the reference is always timed; default: every "
                   "usable backend in fp32, plus compiled:bf16 where supported)")
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="purification steps (default 13)")
    p.add_argument("--heavy", action="store_true", help="include 224x224 on the CPU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: "
                   "torch's; 1 gives steadier numbers on a machine shared with other jobs)")
    p.add_argument("--out", default=None, help="JSON path (default: $XDG_DATA_HOME, else "
                   "~/.local/share, then apudae-engine/bench/purify_<date>_<machine>_<device>"
                   ".json; give benchmarks/results/... to add a record to the repository)")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(a: argparse.Namespace) -> int:
    from apudae_engine.backends.selection import unavailable_reason
    from apudae_engine.core.errors import UserError
    from apudae_engine.method.config import PurifyConfig
    from apudae_engine.perf.bench import CASES, default_result_path, run_bench, write_record

    device = _device(a.device)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    if a.cases:
        cases = [c.strip() for c in a.cases.split(",") if c.strip()]
        unknown = [c for c in cases if c not in CASES]
        if unknown:
            raise UserError(f"unknown case {unknown[0]!r}; choose from {', '.join(CASES)}")
    else:
        cases = [c for c, case in CASES.items()
                 if not case.heavy or a.heavy or device.type == "cuda"]
    if a.backends:
        backends = []
        for item in a.backends.split(","):
            name, _, precision = item.strip().partition(":")
            precision = precision or "fp32"
            if precision not in PRECISIONS:
                raise UserError(f"unknown precision {precision!r} in --backends {item!r}; "
                                f"choose from {', '.join(PRECISIONS)}")
            backends.append((name, precision))
    else:
        backends = [("compiled", "fp32"), ("tensorrt", "fp16")]
        if unavailable_reason("compiled", device, "bf16") is None:
            backends.append(("compiled", "bf16"))
        backends = [b for b in backends if unavailable_reason(b[0], device, b[1]) is None]
    batches = None
    if a.batch:
        try:
            sizes = tuple(int(s) for s in a.batch.split(","))
        except ValueError:
            raise UserError(f"--batch takes comma-separated integers, got {a.batch!r}") from None
        if min(sizes) < 1:
            raise UserError("--batch sizes must be at least 1")
        batches = {c: sizes for c in cases}
    config = PurifyConfig(steps=a.steps)
    record = run_bench(cases, backends, device, batches, a.repeats, config)
    for row in record["results"]:
        print(f"{row['case']:<13} {'x'.join(map(str, row['image'])):>9} batch {row['batch']:>4}"
              f"  {row['backend']:<9} {row['precision']:<4} {row['images_per_s']:>9.1f} img/s"
              f"  x{row['ratio_vs_reference']:<5} {row['gflops_effective']:>7.1f} GFLOP/s"
              f"  active {row['active_fraction']:.2f}")
    if not a.no_write:
        path = write_record(record, a.out or default_result_path(record, bench_results_dir()))
        print(f"wrote {path}")
    return 0


def bench_results_dir() -> Path:
    """Where ``bench`` writes without ``--out``: a per-user folder, not the current directory
    (``$XDG_DATA_HOME/apudae-engine/bench``, default ``~/.local/share/apudae-engine/bench``)."""
    import os

    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "apudae-engine" / "bench"


REGISTER = [register_export, register_verify, register_bench]
