"""``apudae-engine purify-ray``: ``purify`` on Ray Data (argument parsing only; the work is in
``apudae_engine.folder.ray_run``). Building the parser imports neither torch nor ray."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from apudae_engine.cli.options import add_purify_options, add_reject_option

    p = sub.add_parser(
        "purify-ray", help="purify a folder on Ray Data (local or a cluster)",
        description="Like `purify`, with Ray Data actors decoding, purifying and encoding the "
        "images: the same output folder (PNGs, manifest.jsonl, run.json, summary.json), the "
        "same checks and the same resume. Needs `pip install 'apudae-engine[ray]'`. The "
        "folders must be reachable by path from every node.")
    p.add_argument("--input", required=True, help="folder of images (searched recursively)")
    p.add_argument("--output", default=None, help="output folder (default: INPUT_purified)")
    p.add_argument("--batch", type=int, default=512, help="images per actor call")
    p.add_argument("--classifier", default=None, help="classifier name or path ('none' to skip; "
                   "default: the bundled model's)")
    p.add_argument("--overwrite", action="store_true", help="replace results of a different "
                   "earlier run in the output folder")
    p.add_argument("--max-pixels", type=int, default=64_000_000, help="refuse images larger than "
                   "this (decompression bombs)")
    p.add_argument("--follow-symlinks", action="store_true", help="read links that point "
                   "outside the input folder (default: an error record for each)")
    add_reject_option(p, "its manifest record")
    r = p.add_argument_group("ray")
    r.add_argument("--address", default=None, help="cluster to join ('auto', 'ray://HOST:PORT'); "
                   "default: start a local Ray for this run")
    r.add_argument("--actors", type=int, default=None, help="fixed number of purifying actors "
                   "(default: Ray autoscales from 1)")
    r.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs per actor (e.g. 1)")
    r.add_argument("--cpus-per-actor", type=float, default=None, help="CPUs per actor "
                   "(default 1); Ray sets the actor's torch threads to it unless "
                   "OMP_NUM_THREADS is set")
    add_purify_options(p)
    p.set_defaults(func=_cmd_purify_ray)


def _cmd_purify_ray(a: argparse.Namespace) -> int:
    from apudae_engine.cli.options import purify_config
    from apudae_engine.core.errors import UserError
    from apudae_engine.folder.local import FolderJob
    from apudae_engine.folder.ray_run import purify_folder_ray

    if a.actors is not None and a.actors < 1:
        raise UserError(f"--actors must be at least 1, got {a.actors}")
    if a.device.startswith("cuda") and not a.gpus_per_actor:
        raise UserError(f"--device {a.device} needs --gpus-per-actor (e.g. 1): Ray hides the "
                        "GPUs from actors that did not ask for one")
    job = FolderJob(input_dir=a.input, output_dir=a.output, batch_size=a.batch, model=a.model,
                    classifier=a.classifier, config=purify_config(a), device=a.device,
                    backend=a.backend, precision=a.precision, overwrite=a.overwrite,
                    max_pixels=a.max_pixels, follow_symlinks=a.follow_symlinks,
                    reject_flagged=a.reject_flagged)
    summary = purify_folder_ray(job, address=a.address, concurrency=a.actors,
                                num_gpus=a.gpus_per_actor, num_cpus=a.cpus_per_actor)
    return 0 if summary.failed == 0 else 1
