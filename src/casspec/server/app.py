"""The FastAPI application: OpenAI-compatible completions/chat endpoints around one casspec Engine.

Model names: requests may name the served model (``engine.name``, as listed by GET /v1/models), the
alias ``"casspec"``, or omit ``model``; any other name is a 404 ``model_not_found`` (as OpenAI).
Every error, including FastAPI's validation errors (turned from 422 into 400), has the OpenAI body
``{"error": {"message", "type", "param", "code"}}``.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import CasspecError, ContextOverflowError, ModelNotFoundError
from .http import APIError, GateMiddleware, SSEResponse, loc_param, prometheus_text, short, sse
from .schemas import ChatCompletionRequest, CompletionRequest, ErrorResponse
from .worker import GenRequest, Job, JobTimeoutError, Metrics, QueueFullError, Scheduler

log = logging.getLogger("casspec.server")

MODEL_ALIAS = "casspec"
_ERR = {code: {"model": ErrorResponse} for code in (400, 401, 404, 429, 504)}


class _Disconnected(Exception):
    """The client went away while its request waited or ran."""


class _Timeout(Exception):
    """The request ran past its deadline."""


def create_app(engine: Any, *, method: str = "casspec", api_key: str | None = None, max_queue: int = 32,
               max_tokens_limit: int = 2048, request_timeout: float = 300.0, step_delay: float = 0.0) -> FastAPI:
    """Build the server app around ``engine`` (not thread-safe: one worker thread runs it).

    ``max_queue``: waiting requests allowed besides the running one (more -> 429). ``max_tokens_limit``:
    the largest ``max_tokens`` accepted. ``request_timeout``: seconds per request, queueing included
    (then the generation is cancelled and the client gets a 504 / a streamed error event).
    ``step_delay``: testing aid, seconds slept by the worker after each streamed chunk.
    """
    methods = tuple(getattr(engine, "methods", ()) or ())
    if methods and method not in methods:
        raise ValueError(f"unknown method {method!r}; this engine has {', '.join(methods)}")
    if max_queue < 0 or max_tokens_limit < 1 or not request_timeout > 0:
        raise ValueError("max_queue must be >= 0, max_tokens_limit >= 1 and request_timeout > 0")

    metrics = Metrics()
    scheduler = Scheduler(engine, method, max_queue, metrics, step_delay=step_delay)
    model_name = str(getattr(engine, "name", MODEL_ALIAS))
    accepted_names = {model_name, MODEL_ALIAS}
    created = int(time.time())

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
    app.add_middleware(GateMiddleware, api_key=api_key, metrics=metrics)

    # -- error handlers ------------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = list(exc.errors())
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return APIError(400, "We could not parse the JSON body of your request: "
                                 f"{short(first.get('ctx', {}).get('error', first.get('msg', 'invalid JSON')))}",
                            code="invalid_json").response()
        if not loc and first.get("type") == "missing":
            return APIError(400, "The request body must be a JSON object.", code="invalid_body").response()
        if not loc and first.get("type") in ("model_attributes_type", "dict_type", "model_type"):
            return APIError(400, "The request body must be a JSON object (Content-Type: application/json).",
                            code="invalid_body").response()
        msgs: list[str] = []
        for e in errors:
            m = f"'{loc_param(e.get('loc', ())) or 'body'}': {e.get('msg', 'invalid value')}"
            if m not in msgs:
                msgs.append(m)
        more = f" (and {len(msgs) - 3} more)" if len(msgs) > 3 else ""
        return APIError(400, short("Invalid request: " + "; ".join(msgs[:3]) + more, 600),
                        param=loc_param(first.get("loc", ())), code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            msg = f"Unknown request URL: {request.method} {request.url.path}."
        elif exc.status_code == 405:
            msg = f"Method {request.method} is not allowed for {request.url.path}."
        elif exc.status_code == 400:  # FastAPI could not read the body (encoding, form data...)
            return APIError(400, f"We could not parse the body of your request ({short(exc.detail, 200)}); send a "
                                 "JSON object with Content-Type: application/json.", code="invalid_json").response()
        else:
            msg = short(exc.detail)
        typ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return APIError(exc.status_code, msg, type=typ, code=None, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return APIError(500, f"Internal server error ({type(exc).__name__}).", type="server_error").response()

    # -- helpers -------------------------------------------------------------------------------------------
    def check_model(name: str | None) -> None:
        if name is not None and name not in accepted_names:
            raise APIError(404, f"The model '{short(name, 100)}' does not exist. This server serves "
                                f"'{model_name}' (alias '{MODEL_ALIAS}').", param="model", code="model_not_found")

    def reject_unsupported(body: Any, chat: bool) -> None:
        bad = [
            ("n", body.n not in (None, 1), "n > 1 is not supported: one choice per request"),
            ("presence_penalty", body.presence_penalty not in (None, 0), "presence_penalty is not supported"),
            ("frequency_penalty", body.frequency_penalty not in (None, 0), "frequency_penalty is not supported"),
            ("logit_bias", bool(body.logit_bias), "logit_bias is not supported"),
        ]
        if chat:
            rf = (body.response_format or {}).get("type", "text")
            bad += [
                ("logprobs", bool(body.logprobs), "logprobs are not supported"),
                ("top_logprobs", body.top_logprobs is not None, "top_logprobs is not supported"),
                ("tools", bool(body.tools) or bool(body.functions), "tools / function calling are not supported"),
                ("tool_choice", body.tool_choice not in (None, "none") or body.function_call not in (None, "none"),
                 "tool_choice is not supported"),
                ("response_format", rf != "text", "only response_format {'type': 'text'} is supported"),
            ]
        else:
            bad += [
                ("logprobs", body.logprobs is not None, "logprobs are not supported"),
                ("best_of", body.best_of not in (None, 1), "best_of > 1 is not supported"),
                ("echo", bool(body.echo), "echo is not supported"),
                ("suffix", bool(body.suffix), "suffix is not supported"),
            ]
        for param, is_bad, message in bad:
            if is_bad:
                raise APIError(400, message + ".", param=param, code="unsupported_parameter")

    def gen_request(body: Any, prompt: Any, chat: bool) -> GenRequest:
        max_tokens = body.max_tokens
        if chat and body.max_completion_tokens is not None:
            max_tokens = body.max_completion_tokens
        if max_tokens is None:
            max_tokens = min(256 if chat else 16, max_tokens_limit)
        if max_tokens > max_tokens_limit:
            raise APIError(400, f"max_tokens is too large: {max_tokens}. This server allows at most "
                                f"{max_tokens_limit} completion tokens.", param="max_tokens", code="max_tokens_too_large")
        stop = body.stop
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None:
            if any(s == "" for s in stop):
                raise APIError(400, "stop sequences must be non-empty strings.", param="stop", code="invalid_value")
            stop = list(stop) or None
        top_k = body.top_k if body.top_k is not None else 0
        return GenRequest(
            prompt=prompt, max_new_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else float(body.temperature),
            top_p=1.0 if body.top_p is None else float(body.top_p),
            top_k=max(top_k, 0),
            seed=None if body.seed is None else body.seed % (2**32),
            stop=stop, chat=chat,
        )

    context = int(getattr(engine, "context_length", 0) or 0)

    def check_size(n_chars: int, chat: bool) -> None:
        """Refuse absurdly long prompts before they reach (and occupy) the tokenizer in the worker."""
        if context and n_chars > 64 * context:
            raise APIError(400, f"The prompt is {n_chars} characters, far beyond the model's context of {context} "
                                "tokens.", param="messages" if chat else "prompt", code="context_length_exceeded")

    def map_error(exc: BaseException, chat: bool) -> APIError:
        param = "messages" if chat else "prompt"
        if isinstance(exc, JobTimeoutError):
            return APIError(504, f"The request timed out after {request_timeout:g} s ({exc}).",
                            type="timeout_error", code="timeout")
        if isinstance(exc, ContextOverflowError):
            return APIError(400, short(exc, 500), param=param, code="context_length_exceeded")
        if isinstance(exc, ModelNotFoundError):
            return APIError(404, short(exc, 500), param="model", code="model_not_found")
        if isinstance(exc, (CasspecError, ValueError)):
            return APIError(400, short(exc, 500), param=None, code="invalid_request")
        if type(exc).__name__.endswith("TemplateError"):  # jinja2 chat-template raise_exception
            return APIError(400, f"The chat template rejected the messages: {short(exc, 400)}", param="messages",
                            code="invalid_messages")
        log.error("generation failed: %r", exc, exc_info=exc)
        return APIError(500, f"Internal error while generating ({type(exc).__name__}); the server keeps serving.",
                        type="server_error")

    async def wait_item(job: Job, request: Request | None) -> tuple:
        while True:
            remaining = job.deadline - time.monotonic()
            if remaining <= 0:
                raise _Timeout()
            item = await job.next(min(remaining, 0.25))
            now = time.monotonic()
            if request is not None and now - job.checked >= 0.25:  # poll even while chunks keep coming
                job.checked = now
                if await request.is_disconnected():
                    raise _Disconnected()
            if item is not None:
                return item

    def release(job: Job, reason: str) -> None:
        unfinished = scheduler.abandon(job)
        if unfinished and reason == "disconnect":
            metrics.bump("cancelled")
        elif reason == "timeout":
            metrics.bump("timeouts")

    def usage(stats: Any) -> dict:
        p, c = int(stats.prompt_tokens), int(stats.new_tokens)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def extension(result: Any, job: Job) -> dict:
        s = result.stats
        return {
            "method": s.method,
            "mean_accepted_length": s.mean_accepted_length,
            "tokens_per_s": s.tokens_per_s,
            "new_tokens": s.new_tokens,
            "wall_time_s": s.wall_time,
            "prefill_time_s": s.prefill_time,
            "target_forwards": s.target_forwards,
            "queue_time_s": job.queue_time,
            "drafters": {n: {"proposed": d.proposed, "accepted": d.accepted, "acceptance": d.acceptance,
                             "forwards": d.forwards} for n, d in (s.drafters or {}).items()},
        }

    def finish_reason(stats: Any) -> str:
        return "length" if stats.finish_reason == "length" else "stop"

    async def run(request: Request, body: Any, gen: GenRequest, chat: bool):
        job = Job(gen, asyncio.get_running_loop(), request_timeout)
        try:
            scheduler.submit(job)
        except QueueFullError as exc:
            metrics.bump("rejected_queue_full")
            raise APIError(429, f"The server is busy: {exc.args[0]} requests are already waiting (max_queue="
                                f"{max_queue}). Retry later.", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"})
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        now = int(time.time())
        try:
            first = await wait_item(job, request)
        except _Disconnected:
            release(job, "disconnect")
            return Response(status_code=499)
        except _Timeout:
            release(job, "timeout")
            raise map_error(JobTimeoutError("queued or generating"), chat)
        except BaseException:
            release(job, "disconnect")
            raise
        if first[0] == "error":
            release(job, "error")
            raise map_error(first[1], chat)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = stream_events(job, first, chat, rid, now, include_usage)
            return SSEResponse(events, on_close=lambda: release(job, "disconnect" if not job.finished else "done"))
        item = first
        try:
            while item[0] == "chunk":
                item = await wait_item(job, request)
        except _Disconnected:
            release(job, "disconnect")
            return Response(status_code=499)
        except _Timeout:
            release(job, "timeout")
            raise map_error(JobTimeoutError("generating"), chat)
        finally:
            job.finished = True
            release(job, "done")
        if item[0] == "error":
            raise map_error(item[1], chat)
        result = item[1]
        fr = finish_reason(result.stats)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": None,
                      "finish_reason": fr}
        else:
            choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": fr}
        return JSONResponse({
            "id": rid, "object": "chat.completion" if chat else "text_completion", "created": now,
            "model": model_name, "choices": [choice], "usage": usage(result.stats),
            "casspec": extension(result, job),
        })

    async def stream_events(job: Job, item: tuple, chat: bool, rid: str, now: int, include_usage: bool):
        base = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": now,
                "model": model_name}

        def chunk(text: str | None, fr: str | None = None, role: bool = False, **extra) -> str:
            if chat:
                delta = {} if text is None else {"content": text}
                if role:
                    delta["role"] = "assistant"
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": fr}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": fr}
            return sse({**base, "choices": [choice], **extra})

        if chat:
            yield chunk("", role=True)
        while True:
            kind, payload = item
            if kind == "chunk":
                if payload.text:
                    yield chunk(payload.text)
            elif kind == "done":
                job.finished = True
                yield chunk(None, finish_reason(payload.stats), casspec=extension(payload, job))
                if include_usage:
                    yield sse({**base, "choices": [], "usage": usage(payload.stats)})
                yield "data: [DONE]\n\n"
                return
            else:
                job.finished = True
                yield sse(map_error(payload, chat).body())
                yield "data: [DONE]\n\n"
                return
            try:
                item = await wait_item(job, None)
            except _Timeout:
                job.finished = True
                release(job, "timeout")
                yield sse(map_error(JobTimeoutError("while streaming"), chat).body())
                yield "data: [DONE]\n\n"
                return

    # -- routes --------------------------------------------------------------------------------------------
    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "casspec",
                "casspec": {"method": method, "methods": list(methods), "aliases": [MODEL_ALIAS],
                            "context_length": getattr(engine, "context_length", None),
                            "has_chat_template": bool(getattr(engine, "has_chat_template", False))}}

    @app.get("/health", summary="Liveness (no API key needed)")
    async def health():
        ok = scheduler.alive
        return JSONResponse({"status": "ok" if ok else "unhealthy", "model": model_name, "method": method,
                             "busy": scheduler.busy, "waiting": scheduler.waiting}, status_code=200 if ok else 503)

    @app.get("/metrics", summary="Server counters: JSON, or Prometheus text with ?format=prometheus")
    async def get_metrics(request: Request, format: str | None = None):
        snap = metrics.snapshot()
        snap = {"model": model_name, "method": method,
                "queue": {"waiting": scheduler.waiting, "running": int(scheduler.busy), "max_queue": max_queue},
                **snap}
        accept = request.headers.get("accept", "")
        if format == "prometheus" or (format is None and ("openmetrics" in accept or accept.startswith("text/plain"))):
            return PlainTextResponse(prometheus_text(snap), media_type="text/plain; version=0.0.4")
        return snap

    @app.get("/v1/models", responses=_ERR)
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}", responses=_ERR)
    async def get_model(model_id: str):
        check_model(model_id)
        return model_card()

    @app.post("/v1/completions", responses=_ERR)
    async def completions(body: CompletionRequest, request: Request):
        """OpenAI text completion (raw prompt, no chat template). ``stream: true`` answers with SSE."""
        check_model(body.model)
        reject_unsupported(body, chat=False)
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "prompt must be a string or a list of exactly one string (no batching).",
                               param="prompt", code="invalid_value")
            prompt = prompt[0]
        if not prompt.strip():
            raise APIError(400, "prompt must not be empty (or only whitespace).", param="prompt", code="empty_prompt")
        check_size(len(prompt), chat=False)
        return await run(request, body, gen_request(body, prompt, chat=False), chat=False)

    @app.post("/v1/chat/completions", responses=_ERR)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        """OpenAI chat completion through the model's chat template. ``stream: true`` answers with SSE."""
        check_model(body.model)
        reject_unsupported(body, chat=True)
        if not body.messages:
            raise APIError(400, "messages must be a non-empty list.", param="messages", code="empty_messages")
        if not getattr(engine, "has_chat_template", False):
            raise APIError(400, f"The model '{model_name}' has no chat template, so chat completions are "
                                "unavailable; use /v1/completions with a raw prompt.", param="messages",
                           code="no_chat_template")
        messages = []
        for i, m in enumerate(body.messages):
            content = m.content
            if isinstance(content, list):
                texts = []
                for part in content:
                    if part.type != "text" or part.text is None:
                        raise APIError(400, f"messages[{i}].content: only text parts are supported (got "
                                            f"'{short(part.type, 40)}').", param=f"messages.{i}.content",
                                       code="unsupported_content")
                    texts.append(part.text)
                content = "\n".join(texts)
            if m.role == "user" and not (content or "").strip():
                raise APIError(400, f"messages[{i}] is a user message without content.",
                               param=f"messages.{i}.content", code="empty_content")
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
        check_size(sum(len(m["content"]) for m in messages), chat=True)
        return await run(request, body, gen_request(body, messages, chat=True), chat=True)

    return app
