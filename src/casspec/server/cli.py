"""The `casspec serve` command: its arguments, the engine it loads, one process or Ray replicas."""
from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from collections.abc import Mapping

from casspec.cli import add_drafts_arg
from casspec.runtime import heap

from .app import create_app

__all__ = ["add_parser", "app_kwargs", "serve", "main", "load_engine", "resolve_api_key"]

API_KEY_ENV = "CASSPEC_API_KEY"


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return v


def _nonneg_int(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return v


def _positive_float(text: str) -> float:
    v = float(text)
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError("must be a positive number")
    return v


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """--model / --method and the hidden test switch --tiny-engine FAMILY (casspec.testing.tiny_engine)."""
    p.add_argument("--model", default=None, help="model name (smollm2, gemma3-270m), HF dir or .gguf (default: casspec's default)")
    p.add_argument("--method", default="casspec", help="decoding method (default: casspec)")
    p.add_argument("--tiny-engine", default=None, metavar="FAMILY", help=argparse.SUPPRESS)
    add_drafts_arg(p)
    p.add_argument("--prefix-cache-tokens", type=_nonneg_int, default=None, metavar="N",
                   help="KV of prompt prefixes kept between requests, in tokens (0 = off; default: 1 GiB of KV, "
                        "at most 65536 tokens)")


def load_engine(args: argparse.Namespace):
    if getattr(args, "tiny_engine", None):
        from casspec.testing import tiny_engine

        engine = tiny_engine(args.tiny_engine)
    else:
        import casspec

        engine = casspec.load(args.model, hierarchy=getattr(args, "drafts", None))
        heap.settle()
    tokens = getattr(args, "prefix_cache_tokens", None)
    if tokens is not None and hasattr(engine, "runner"):  # --prefix-cache-tokens: resize (0: no prefix cache)
        from casspec.runtime.prefix_cache import PrefixCache

        engine.prefix_cache = PrefixCache.for_runner(engine.runner, tokens) if tokens else None
    return engine


def configure_parser(p: argparse.ArgumentParser) -> None:
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (all but /health); visible to other users in the process "
                        f"list: prefer --api-key-file or the {API_KEY_ENV} environment variable")
    p.add_argument("--api-key-file", default=None, metavar="PATH",
                   help="read the API key from this file (its first line)")
    p.add_argument("--max-body-bytes", type=_positive_int, default=4 * 1024 * 1024,
                   help="request bodies larger than this get a 413 before they are read (default: 4 MiB)")
    p.add_argument("--max-batch", type=_positive_int, default=8,
                   help="requests decoded together, continuous batching (default: 8; 1 = one at a time)")
    p.add_argument("--max-queue", type=_nonneg_int, default=32,
                   help="requests that may wait besides the running batch; more get 429 (default: 32)")
    p.add_argument("--max-tokens-limit", type=_positive_int, default=2048,
                   help="largest max_tokens a request may ask for (default: 2048)")
    p.add_argument("--timeout", type=_positive_float, default=300.0,
                   help="seconds per request, queueing included; then it is cancelled (default: 300)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--step-delay", type=float, default=0.0, help=argparse.SUPPRESS)  # testing: slow the worker
    p.add_argument("--replicas", type=_positive_int, default=1,
                   help="engine replicas behind one endpoint on Ray Serve; > 1 needs pip install 'casspec[serve]' "
                        "(default: 1 = this process, no Ray)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch threads per engine (default: torch's choice; with --replicas N, cores // N)")


def app_kwargs(args: argparse.Namespace) -> dict:
    """create_app's keyword arguments from the serve options (shared by the single server and replicas)."""
    kw = dict(method=args.method, api_key=args.api_key, max_queue=args.max_queue,
              max_tokens_limit=args.max_tokens_limit, request_timeout=args.timeout, step_delay=args.step_delay,
              max_batch=args.max_batch)
    if getattr(args, "max_body_bytes", None):
        kw["max_body_bytes"] = args.max_body_bytes
    return kw


def resolve_api_key(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> str | None:
    """The key from --api-key, else --api-key-file (first line), else $CASSPEC_API_KEY; None for no key.

    Raises ValueError (a usage error) for both flags at once, an unreadable file or an empty key.
    """
    env = os.environ if environ is None else environ
    key, path = getattr(args, "api_key", None), getattr(args, "api_key_file", None)
    if key is not None and path is not None:
        raise ValueError("pass --api-key or --api-key-file, not both")
    if path is not None:
        try:
            with open(os.path.expanduser(path), encoding="utf-8") as fh:
                key = fh.readline().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read --api-key-file {path}: {exc}") from None
        if not key:
            raise ValueError(f"--api-key-file {path} holds no key")
    elif key is None:
        key = env.get(API_KEY_ENV) or None
    if key is not None and not key.strip():
        raise ValueError("the API key is empty")
    return key


def add_parser(subparsers) -> None:
    """Register ``serve`` on an argparse subparsers object."""
    p = subparsers.add_parser("serve", help="OpenAI-compatible streaming HTTP server",
                              description="Serve a model over an OpenAI-compatible HTTP API (completions, chat, SSE). "
                                          "--replicas N (N > 1) runs N engine replicas behind the same endpoint on "
                                          "Ray Serve (pip install 'casspec[serve]'); Ctrl-C stops them all.")
    configure_parser(p)
    p.set_defaults(func=serve)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _serve_replicas(args: argparse.Namespace) -> int:
    """--replicas N > 1: hand over to casspec.server.replicas (Ray Serve), if Ray is installed."""
    try:
        from . import replicas
    except ImportError as exc:
        print(f"error: --replicas {args.replicas} needs Ray Serve ({exc}); install it with: "
              "pip install 'casspec[serve]'", file=sys.stderr)
        return 2
    return replicas.serve_replicas(args)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    try:
        args.api_key, args.api_key_file = resolve_api_key(args), None
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not _is_loopback(args.host) and not args.api_key:
        print(f"warning: binding {args.host} without --api-key exposes the model to the network", file=sys.stderr)
    if getattr(args, "replicas", 1) > 1:
        return _serve_replicas(args)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    print("loading model...", file=sys.stderr, flush=True)
    engine = load_engine(args)
    try:
        app = create_app(engine, **app_kwargs(args))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"serving '{getattr(engine, 'name', '?')}' (method {args.method}) on http://{args.host}:{args.port}/v1",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5,
                access_log=args.log_level == "debug")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m casspec.server", description=serve.__doc__)
    configure_parser(parser)
    return serve(parser.parse_args(argv))
