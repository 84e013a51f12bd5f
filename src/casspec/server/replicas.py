"""``casspec serve --replicas N``: N engine replicas behind one OpenAI-compatible endpoint (Ray Serve).

Each replica is a Ray actor that loads its own engine through the same :func:`load_engine` path as the
single-process server (so ``--model`` and the hidden ``--tiny-engine`` work alike), builds the same
FastAPI app with :func:`create_app` and the same options (``--max-batch``, ``--max-queue``, ``--api-key``,
...), and hands it to Ray Serve as its ASGI ingress. Ray Serve's HTTP proxy listens on ``--host:--port``
and routes every request (SSE streams included) to the less loaded of two randomly picked replicas.
Every response names its replica in the ``x-casspec-replica`` header.

    pip install 'casspec[serve]'
    casspec serve --model smollm2 --replicas 4 --port 8000        # 4 engines, one URL; Ctrl-C stops all
    casspec serve --replicas 2 --threads 4                          # torch threads per replica

Ray is optional: only this module imports it, and only ``--replicas`` > 1 imports this module.
Exposure: the HTTP endpoint listens on ``--host`` (loopback by default) and the dashboard is off; Ray's own
gRPC ports (GCS, raylet) listen on every interface on Linux whatever the node address, so the local cluster
runs with Ray's token authentication (``RAY_AUTH_MODE=token`` and a random ``RAY_AUTH_TOKEN`` for this run)
unless the environment already sets ``RAY_AUTH_MODE`` (set it to ``disabled`` to opt out).
Each replica reserves one logical Ray CPU and runs ``--threads`` torch threads (default: the machine's
cores divided among the replicas). A replica admits ``--max-batch + --max-queue`` requests at once (its
own queue then answers 429 as the single server does); more wait in Ray's router.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast


def _token_auth() -> None:
    """Ray's token authentication for the local cluster (read when ray is imported, hence before it):
    nobody on the network may join this cluster or run code in it."""
    if "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))


_token_auth()
import ray  # noqa: E402  (after _token_auth: Ray reads its auth settings at import)
from ray import serve  # noqa: E402

from ..runtime.threads import release_openmp_pool  # noqa: E402
from .app import create_app  # noqa: E402
from .cli import app_kwargs, load_engine  # noqa: E402

__all__ = ["EngineReplica", "default_threads", "run_replicas", "serve_replicas"]

APP_NAME = "casspec"
REPLICA_HEADER = b"x-casspec-replica"
_ARG_NAMES = ("model", "method", "tiny_engine", "api_key", "max_batch", "max_queue", "max_tokens_limit", "timeout",
              "step_delay", "log_level", "max_body_bytes")


def default_threads(replicas: int) -> int:
    """Torch threads per replica when --threads is not given: the cores shared among the replicas."""
    return max(1, (os.cpu_count() or 1) // max(1, replicas))


@contextlib.contextmanager
def _load_lock() -> Iterator[None]:
    """One replica on this machine loads at a time: the first fills casspec's caches, the rest read them."""
    from casspec.runtime.loading import model_cache_dir

    with open(Path(model_cache_dir()) / ".replica-load.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class _ReplicaHeader:
    """ASGI middleware: adds ``x-casspec-replica: ID`` to every HTTP response (streams included)."""

    def __init__(self, app: Any, replica: str) -> None:
        self.app, self.value = app, replica.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER, self.value)]}
            await send(message)

        await self.app(scope, receive, send_with_header)


@serve.deployment(name="casspec-engine")
@serve.ingress()
class EngineReplica:
    """One replica: its own engine and the single-process server's FastAPI app, served by Ray Serve."""

    def __init__(self, args: dict[str, Any], threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        ns = argparse.Namespace(**args)
        with _load_lock():  # concurrent first loads would race writing the int8 / latency-model caches
            self.engine = load_engine(ns)
        release_openmp_pool()  # the decode worker thread takes the model over (runtime/threads.py)
        self.fastapi_app = create_app(self.engine, **app_kwargs(ns))
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - only a label
            replica = str(os.getpid())
        self.fastapi_app.add_middleware(_ReplicaHeader, replica=replica)

    def check_health(self) -> None:
        """Ray Serve's periodic health check: a replica whose decode worker thread is gone is unhealthy
        (Ray restarts it). The worker supervises itself, so this should never fire."""
        if not self.fastapi_app.state.scheduler.alive:
            raise RuntimeError("the replica's decode worker thread is not running")

    def __serve_build_asgi_app__(self) -> Any:
        """Ray Serve calls this after __init__ and runs the app's lifespan (the decode worker thread)."""
        return self.fastapi_app


def run_replicas(args: argparse.Namespace, replicas: int, threads: int | None = None) -> str:
    """Start a local Ray, deploy ``replicas`` engine replicas on args.host:args.port; returns the base URL.

    Blocks until every replica has loaded its engine; raises if one fails (after a few retries).
    """
    threads = threads or default_threads(replicas)
    quiet = args.log_level not in ("info", "debug")
    ray.init(address="local", num_cpus=max(replicas, os.cpu_count() or 1), include_dashboard=False,
             log_to_driver=not quiet, configure_logging=True, logging_level=getattr(logging, args.log_level.upper()),
             object_store_memory=128 * 1024**2)
    logging.getLogger("ray.serve").setLevel(getattr(logging, args.log_level.upper()))
    print(f"ray started; deploying {replicas} replicas ({threads} torch threads each)...", file=sys.stderr, flush=True)
    serve.start(http_options={"host": args.host, "port": args.port},
                logging_config={"log_level": args.log_level.upper(), "enable_access_log": args.log_level == "debug"})
    # @serve.deployment turned the class into a Deployment; mypy keeps a decorated class's own type
    deployment = cast(serve.Deployment, EngineReplica).options(num_replicas=replicas, ray_actor_options={"num_cpus": 1},
                                       max_ongoing_requests=args.max_batch + args.max_queue,
                                       max_constructor_retry_count=replicas + 1, health_check_period_s=5)
    spec = {name: getattr(args, name, None) for name in _ARG_NAMES}
    serve.run(deployment.bind(spec, threads), name=APP_NAME, route_prefix="/")
    return f"http://{args.host}:{args.port}"


def _deployment_messages() -> str:
    """The deployments' status messages (a failed replica's traceback), for the error report."""
    try:
        app = serve.status().applications[APP_NAME]
        return "".join(f"\n{name}: {d.message}" for name, d in app.deployments.items() if d.message)
    except Exception:  # noqa: BLE001 - best effort
        return ""


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def serve_replicas(args: argparse.Namespace) -> int:
    """The ``casspec serve --replicas N`` command: deploy, print the URL, block until Ctrl-C/SIGTERM."""
    from casspec.methods import METHODS

    if args.method not in METHODS:  # checked here too, so a typo does not cost N failed model loads
        print(f"error: unknown method {args.method!r}; choose one of {', '.join(METHODS)}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _sigterm)
    # Ctrl-C / SIGINT stops the replicas even where SIGINT came in ignored (a background job of a script, a parent
    # that ignored it when it started us): Python installs its handler only when SIGINT is not ignored at start.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        url = run_replicas(args, args.replicas, args.threads)
        print(f"serving {args.replicas} replicas (method {args.method}) on {url}/v1", file=sys.stderr, flush=True)
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        return 0
    except Exception as exc:  # noqa: BLE001 - a failed deployment: report it, exit non-zero
        print(f"error: replicas failed to start: {exc}{_deployment_messages()}", file=sys.stderr)
        return 1
    finally:
        print("shutting down replicas...", file=sys.stderr, flush=True)
        if ray.is_initialized():
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
