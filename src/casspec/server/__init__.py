"""``casspec serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) around one casspec Engine.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with ``stream: true``
SSE), GET /health, GET /metrics. One worker thread decodes up to ``--max-batch`` requests together
(continuous batching, :mod:`casspec.server.batch_worker`), or one at a time in FIFO order
(:mod:`casspec.server.worker`) for methods that do not batch.

    casspec serve --model smollm2 --port 8000 --api-key-file ~/.casspec-key   # or CASSPEC_API_KEY=... in the env
    python -m casspec.server ...        # same, without the main CLI

Scale-out: ``--replicas N`` (N > 1, needs ``pip install 'casspec[serve]'``) runs N engine replicas, each
with its own engine and this same app, behind one endpoint on Ray Serve (:mod:`casspec.server.replicas`);
``--threads`` sets torch threads per replica (default: cores // N). With the default ``--replicas 1``
the server is this single process and Ray is never imported.

    casspec serve --model smollm2 --replicas 4 --port 8000
"""
from __future__ import annotations

from .app import MODEL_ALIAS, APIError, create_app
from .cli import add_parser, app_kwargs, load_engine, main, resolve_api_key, serve

__all__ = ["add_parser", "app_kwargs", "create_app", "serve", "main", "MODEL_ALIAS", "APIError", "load_engine",
           "resolve_api_key"]
