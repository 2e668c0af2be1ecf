"""``apudae-engine serve``: the purifier behind an HTTP endpoint on Ray Serve (argument parsing
only; the work is in ``apudae_engine.serve``). Building the parser imports neither torch nor
ray."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from apudae_engine.cli.options import add_purify_options, add_reject_option

    p = sub.add_parser(
        "serve", help="serve purification (and a classifier) over HTTP with Ray Serve",
        description="Start a local Ray Serve application on 127.0.0.1 that purifies the images "
        "POSTed to /purify (a PNG/JPEG body, or JSON with base64 images or float arrays) and "
        "answers with a status per image (ok, or rejected under --reject-flagged), the purified "
        "images, r before/after, active steps, flagged and, with a classifier, the labels. "
        "Images of concurrent requests are batched together. Ctrl-C stops it. Needs "
        "`pip install 'apudae-engine[serve]'`.")
    p.add_argument("--classifier", default=None, help="classifier name or path ('none' to skip; "
                   "default: the bundled model's)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port on 127.0.0.1 (default 8000)")
    p.add_argument("--host", default="127.0.0.1", help="loopback address to bind (127.0.0.1)")
    p.add_argument("--max-batch", type=int, default=32, help="most images purified together "
                   "(default 32)")
    p.add_argument("--batch-wait", type=float, default=0.01, metavar="SECONDS", help="how long a "
                   "batch waits for more requests (default 0.01)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads of the replica")
    add_reject_option(p, "its result (HTTP 200)")
    add_purify_options(p)
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(a: argparse.Namespace) -> int:
    from apudae_engine.cli.options import purify_config
    from apudae_engine.core.errors import UserError
    from apudae_engine.serve.app import serve_forever
    from apudae_engine.serve.engine import ServeSettings

    if a.device not in ("auto", "cpu"):
        raise UserError("serve runs on the CPU for now; drop --device")
    try:
        config = purify_config(a)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    serve_forever(ServeSettings(model=a.model, classifier=a.classifier, config=config,
                                backend=a.backend, precision=a.precision,
                                reject_flagged=a.reject_flagged,
                                max_batch_size=a.max_batch, batch_wait_s=a.batch_wait,
                                host=a.host, port=a.port, threads=a.threads))
    return 0
