"""The FastAPI application: OpenAI-compatible completions/chat endpoints around one casspec Engine.

Model names: requests may name the served model (``engine.name``, as listed by GET /v1/models), the
alias ``"casspec"``, or omit ``model``; any other name is a 404 ``model_not_found`` (as OpenAI).
Every error, including FastAPI's validation errors (turned from 422 into 400), has the OpenAI body
``{"error": {"message", "type", "param", "code"}}`` (see errors.py).
"""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from casspec.batching import BATCH_METHODS

from .batch_worker import BatchWorker
from .errors import install_error_handlers
from .http import APIError, BodyLimitMiddleware, GateMiddleware, prometheus_text
from .openapi import install_openapi
from .requests import chat_messages, completion_prompts, gen_request, reject_unsupported
from .schemas import ChatCompletionRequest, CompletionRequest, ErrorResponse
from .service import MODEL_ALIAS, CompletionService, ServerConfig
from .worker import FifoWorker, Metrics

log = logging.getLogger("casspec.server")

__all__ = ["MODEL_ALIAS", "APIError", "create_app"]

_ERR: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 500, 504)}
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024  # request bodies over this get a 413 before they are parsed


def create_app(engine: Any, *, method: str = "casspec", api_key: str | None = None, max_queue: int = 32,
               max_tokens_limit: int = 2048, request_timeout: float = 300.0, step_delay: float = 0.0,
               max_batch: int = 8, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """Build the server app around ``engine`` (not thread-safe: one worker thread runs it).

    ``max_batch``: requests decoded together (continuous batching; 1 = one at a time, FIFO).
    ``max_queue``: waiting requests allowed besides the running ones (more -> 429). ``max_tokens_limit``:
    the largest ``max_tokens`` accepted. ``request_timeout``: seconds per request, queueing included
    (then the generation is cancelled and the client gets a 504 / a streamed error event).
    ``max_body_bytes``: larger request bodies get a 413 before they are read.
    ``step_delay``: testing aid, seconds slept by the worker after each streamed chunk.
    """
    methods = tuple(getattr(engine, "methods", ()) or ())
    if methods and method not in methods:
        raise ValueError(f"unknown method {method!r}; this engine has {', '.join(methods)}")
    if max_queue < 0 or max_tokens_limit < 1 or not request_timeout > 0 or max_batch < 1 or max_body_bytes < 1024:
        raise ValueError("max_queue must be >= 0, max_tokens_limit >= 1, request_timeout > 0, max_batch >= 1 "
                         "and max_body_bytes >= 1024")
    cfg = ServerConfig(method, max_queue, max_tokens_limit, request_timeout)
    metrics = Metrics()
    scheduler = _scheduler(engine, method, max_queue, metrics, step_delay, max_batch)
    service = CompletionService(engine, cfg, scheduler, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(
        title="casspec OpenAI-compatible server",
        description="Lossless speculative decoding (CAS-Spec) behind the OpenAI completions/chat API.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.engine, app.state.scheduler, app.state.metrics = engine, scheduler, metrics
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    app.add_middleware(GateMiddleware, api_key=api_key, metrics=metrics)  # outermost: auth before the body
    install_error_handlers(app)
    install_openapi(app, model_names=[service.model_name, MODEL_ALIAS], max_tokens=max_tokens_limit,
                    vocab_size=getattr(getattr(engine, "runner", None), "vocab_size", None))
    _add_info_routes(app, service)
    _add_generation_routes(app, service)
    return app


def _scheduler(engine: Any, method: str, max_queue: int, metrics: Metrics, step_delay: float,
               max_batch: int) -> FifoWorker | BatchWorker:
    """The batched worker where the engine and method batch; else requests run one at a time."""
    if max_batch > 1 and hasattr(engine, "runner") and method in BATCH_METHODS:
        return BatchWorker(engine, method, max_queue, metrics, max_batch, step_delay)
    if max_batch > 1 and hasattr(engine, "runner"):
        log.warning("method %s does not batch (batched: %s): serving one request at a time", method,
                    ", ".join(BATCH_METHODS))
    return FifoWorker(engine, method, max_queue, metrics, step_delay=step_delay)


def _add_info_routes(app: FastAPI, service: CompletionService) -> None:
    scheduler, cfg = service.scheduler, service.cfg

    @app.get("/health", summary="Liveness (no API key needed)")
    async def health():
        ok = scheduler.alive
        return JSONResponse({"status": "ok" if ok else "unhealthy", "model": service.model_name,
                             "method": cfg.method, "busy": scheduler.busy, "waiting": scheduler.waiting},
                            status_code=200 if ok else 503)

    @app.get("/metrics", summary="Server counters: JSON, or Prometheus text with ?format=prometheus")
    async def get_metrics(request: Request, format: str | None = None):
        snap = {"model": service.model_name, "method": cfg.method,
                "queue": {"waiting": scheduler.waiting, "running": scheduler.running,
                          "max_queue": cfg.max_queue, "max_batch": scheduler.max_batch},
                **service.metrics.snapshot()}
        prefix = getattr(service.engine, "prefix_cache", None)
        if prefix is not None:  # occupancy and hits of the KV kept between requests
            snap["prefix_cache"] = prefix.stats()
        planner = scheduler.planner_stats()
        if planner is not None:  # the batch planner's own time (lookups + planning) per step
            snap["batch_planner"] = planner
        accept = request.headers.get("accept", "")
        if format == "prometheus" or (format is None and ("openmetrics" in accept or accept.startswith("text/plain"))):
            return PlainTextResponse(prometheus_text(snap), media_type="text/plain; version=0.0.4")
        return snap

    @app.get("/v1/models", responses=_ERR)
    async def list_models():
        return {"object": "list", "data": [service.model_card()]}

    @app.get("/v1/models/{model_id}", responses=_ERR)
    async def get_model(model_id: str):
        service.check_model(model_id)
        return service.model_card()


def _add_generation_routes(app: FastAPI, service: CompletionService) -> None:
    limit = service.cfg.max_tokens_limit

    @app.post("/v1/completions", responses=_ERR)
    async def completions(body: CompletionRequest, request: Request):
        """OpenAI text completion (raw prompt, no chat template). ``stream: true`` answers with SSE."""
        service.check_model(body.model)
        reject_unsupported(body, chat=False)
        prompts = completion_prompts(body, service.vocab_size)
        for p in prompts:
            if isinstance(p, str):
                service.check_size(len(p), chat=False)
        gens = [gen_request(body, p, False, limit) for p in prompts]
        if len(gens) > 1:  # several prompts: one choice each (OpenAI's batched completions)
            return await service.run_many(request, body, gens)
        return await service.run(request, body, gens[0], chat=False)

    @app.post("/v1/chat/completions", responses=_ERR)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        """OpenAI chat completion through the model's chat template. ``stream: true`` answers with SSE."""
        service.check_model(body.model)
        reject_unsupported(body, chat=True)
        if body.messages:
            service.require_chat_template()
        messages = chat_messages(body)
        service.check_size(sum(len(m["content"]) for m in messages), chat=True)
        return await service.run(request, body, gen_request(body, messages, True, limit), chat=True)
