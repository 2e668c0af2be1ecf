"""The work behind the endpoint: one loaded purifier (and classifier), warmed once, that
purifies a batch of request items and returns one result per item. No Ray here.

Each item's result follows :mod:`apudae_engine.folder.batch` (the rule ``purify`` follows):
``status`` ``ok`` with the purified image, ``rejected`` (``--reject-flagged``, a flagged image)
without it, or ``error`` naming the image whose result held NaN or Inf
(:func:`apudae_engine.serve.requests.response` answers that request with HTTP 500).

Example::

    engine = ServingEngine(ServeSettings(model="fmnist"))
    results = engine.purify_items(parse_request(png_bytes, "image/png", engine.input_shape))
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from apudae_engine.backends.purifier import Purifier
from apudae_engine.core.errors import UserError
from apudae_engine.folder.batch import ERROR, OK, BatchPurifier
from apudae_engine.method.checkpoint import load_classifier
from apudae_engine.method.config import PurifyConfig
from apudae_engine.method.purification import image_fingerprint
from apudae_engine.serve.requests import Item, encode_png_base64

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeSettings:
    """What ``apudae-engine serve`` runs.

    Args:
        model: bundled model name or DAE checkpoint path.
        classifier: classifier name or path; None takes the model's own, ``"none"`` none.
        config: purification settings (adaptive by default).
        backend: as ``Purifier``: ``auto`` (default; compiled where it runs, a server's
            stream being long enough to repay compiling), ``reference`` or ``compiled``.
        precision: as ``Purifier``.
        reject_flagged: flagged images are answered with the status ``rejected`` and no
            purified image.
        max_batch_size: most images purified together (``@serve.batch``).
        batch_wait_s: how long a batch waits for more requests before it runs.
        host, port: where HTTP listens; the host must be a loopback address.
        threads: torch CPU threads of the replica (None: torch's default).
    """

    model: str = "fmnist"
    classifier: str | None = None
    config: PurifyConfig = field(default_factory=PurifyConfig)
    backend: str = "auto"
    precision: str = "fp32"
    reject_flagged: bool = False
    max_batch_size: int = 32
    batch_wait_s: float = 0.01
    host: str = "127.0.0.1"
    port: int = 8000
    threads: int | None = None

    def __post_init__(self) -> None:
        # One secret seed for the deployment (unless given), settled before replicas start.
        object.__setattr__(self, "config", self.config.with_secret_seed())
        if self.max_batch_size < 1:
            raise UserError(f"--max-batch must be at least 1, got {self.max_batch_size}")
        if self.batch_wait_s < 0:
            raise UserError(f"--batch-wait must be non-negative, got {self.batch_wait_s}")
        if self.host not in ("127.0.0.1", "localhost", "::1"):
            raise UserError(f"--host {self.host}: the server binds to loopback only "
                            "(127.0.0.1); put a reverse proxy in front to expose it")
        if not 0 < self.port < 65536:
            raise UserError(f"--port must lie in 1..65535, got {self.port}")


class ServingEngine:
    """A purifier and optional classifier on the CPU, warmed by one purification at start."""

    def __init__(self, settings: ServeSettings) -> None:
        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.settings = settings
        self.purifier = Purifier.from_pretrained(settings.model, settings.config, "cpu",
                                                 settings.backend, settings.precision)
        shape = self.purifier.input_shape
        if shape is None:
            raise UserError(f"{settings.model}: the checkpoint does not record its input shape")
        self.input_shape: tuple[int, int, int] = shape
        clf = load_classifier(settings.model, settings.classifier)
        self.classifier = None if clf is None else clf.model.eval()
        self.labels = None if clf is None else clf.meta.get("labels")
        self.batches = BatchPurifier(self.purifier, self.classifier, settings.reject_flagged)
        self.threshold = self.batches.threshold
        t0 = time.perf_counter()
        # compile / warm the caches
        self.purify_items([Item(torch.zeros(shape), 0, "array", "warm-up")])
        log.info("serve: %s (backend %s -> %s) warmed in %.2f s; classifier %s",
                 settings.model, settings.backend,
                 self.purifier.backend_report("cpu")["backend"], time.perf_counter() - t0,
                 "none" if clf is None else clf.path)

    def info(self) -> dict:
        """What GET answers: the model, its input shape, the settings and what runs."""
        return {"model": self.settings.model, "input_shape": list(self.input_shape),
                "classifier": self.classifier is not None, "labels": self.labels,
                "backend": self.settings.backend, "settings": self.purifier.config.to_dict(),
                "flag_threshold": self.threshold,
                "reject_flagged": self.settings.reject_flagged,
                "ran": self.purifier.backend_report("cpu")}

    @torch.no_grad()
    def purify_items(self, items: list[Item]) -> list[dict]:
        """Purify the items as one batch; one result dict per item, in order."""
        x = torch.stack([it.image for it in items])
        ids = image_fingerprint(x)  # the Python API's default identity
        given = [i for i, it in enumerate(items) if it.image_id is not None]
        if given:
            ids[given] = torch.tensor([items[i].image_id for i in given], dtype=torch.int64)
        done = self.batches(x, ids, [it.name for it in items])
        results = []
        for it, image, o in zip(items, done.images, done.outcomes):
            if o.status == ERROR:
                results.append({"status": ERROR, "error": o.error})
                continue
            res = {"status": o.status, "r_before": o.r_before, "r_after": o.r_after,
                   "active_steps": o.active_steps, "flagged": o.flagged}
            if o.status == OK:
                if it.output == "png":
                    res["png"] = encode_png_base64(image)
                else:
                    res["array"] = image.tolist()
            res.update(o.label_fields(self.labels))
            results.append(res)
        return results
