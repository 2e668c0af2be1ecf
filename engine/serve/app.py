"""The Ray Serve application: one deployment around :class:`ServingEngine`, with requests'
images batched together by ``@serve.batch``, on a local Ray bound to the loopback interface.

``start`` brings Ray and Serve up and returns the endpoint's URL; ``stop`` shuts both down
(no process is left behind); ``serve_forever`` is ``apudae-engine serve``. Ray is imported
only here and only when called (``pip install 'apudae-engine[serve]'``).

Example::

    url = start(ServeSettings(model="fmnist", port=8000))
    requests.post(url, data=open("shirt.png", "rb").read(),
                  headers={"Content-Type": "image/png"}).json()
    stop()
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading

from apudae_engine.core.errors import UserError
from apudae_engine.serve.engine import ServeSettings, ServingEngine
from apudae_engine.serve.requests import Item, RequestError, parse_request, response

log = logging.getLogger(__name__)
APP_NAME = "apudae"
ROUTE = "/purify"


def _import_serve():
    # Ray's single-machine mode (its default on macOS and Windows) binds every Ray port to
    # 127.0.0.1; in cluster mode, Linux's default, a local Ray listens on the node's address.
    # Read when Ray is first imported, and inherited by its workers.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
        from ray import serve
    except ImportError:
        raise UserError("serving needs Ray Serve; pip install 'apudae-engine[serve]'") from None
    return ray, serve


def build_app(settings: ServeSettings):
    """The bound Serve application (one replica; the batch size and wait come from
    ``settings``)."""
    _, serve = _import_serve()
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    # Spinning OpenMP threads starve each other on a few shared cores (10x slower on 2);
    # `apudae-engine` sets PASSIVE before torch loads, and the replica gets the same.
    env = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}

    @serve.deployment(name="purifier", num_replicas=1, max_ongoing_requests=1024,
                      ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": env}})
    class PurifierDeployment:
        def __init__(self, settings: ServeSettings) -> None:
            logging.basicConfig(level=logging.INFO)
            self.engine = ServingEngine(settings)  # loads and warms once, before traffic

        async def __call__(self, request: Request):
            if request.method == "GET":
                return JSONResponse(self.engine.info())
            body = await request.body()
            try:
                items = parse_request(body, request.headers.get("content-type"),
                                      self.engine.input_shape)
            except RequestError as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
            results = await asyncio.gather(*(self.purify(item) for item in items))
            status, doc = response(list(results))
            return JSONResponse(doc, status_code=status)

        @serve.batch(max_batch_size=settings.max_batch_size,
                     batch_wait_timeout_s=settings.batch_wait_s)
        async def purify(self, items: list[Item]) -> list[dict]:
            # In a worker thread, so the replica keeps accepting (and batching) requests.
            return await asyncio.to_thread(self.engine.purify_items, items)

    return PurifierDeployment.bind(settings)


def start(settings: ServeSettings) -> str:
    """Start a local Ray (loopback only, no dashboard) and Serve; deploy; return the URL.
    Returns once the replica has loaded and warmed the model. Ray's own ports stay on
    127.0.0.1 when Ray is first imported here (see ``_import_serve``)."""
    ray, serve = _import_serve()
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build_app(settings), name=APP_NAME, route_prefix=ROUTE)
    url = f"http://{settings.host}:{settings.port}{ROUTE}"
    log.info("serving %s at %s (POST images; GET for the model's settings)", settings.model,
             url)
    return url


def stop() -> None:
    """Shut Serve and the local Ray down."""
    ray, serve = _import_serve()
    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def serve_forever(settings: ServeSettings) -> None:
    """``apudae-engine serve``: start, then wait for Ctrl-C or SIGTERM, then stop."""
    done = threading.Event()
    # Both signals stop the server, also where SIGINT was ignored by whoever started it
    # (a shell's background job).
    previous = {sig: signal.signal(sig, lambda *_: done.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        url = start(settings)
        print(f"serving at {url}; Ctrl-C to stop", flush=True)
        while not done.wait(0.5):
            pass
    finally:
        log.info("shutting down")
        stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
