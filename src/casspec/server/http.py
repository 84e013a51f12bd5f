"""HTTP plumbing for the server: OpenAI-style errors, the auth/status middleware, SSE responses, Prometheus text."""
from __future__ import annotations

import hmac
import json
from typing import Any

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import StreamingResponse

from .metrics import Metrics

OPEN_PATHS = frozenset({"/health"})  # reachable without the API key


class APIError(Exception):
    """An error answered with an OpenAI-style body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def short(text: Any, n: int = 300) -> str:
    text = str(text)
    return text if len(text) <= n else text[: n - 3] + "..."


TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "tuple"}


def loc_param(loc: Any) -> str | None:
    """'messages.0.role' from a pydantic error location (drops 'body' and union-branch tags)."""
    parts = []
    for p in loc:
        if isinstance(p, int):
            parts.append(str(p))
        elif p != "body" and p.isidentifier() and p not in TYPE_TAGS and not p[:1].isupper():
            parts.append(p)
    return ".".join(parts) or None


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


class GateMiddleware:
    """Pure ASGI middleware: API-key check (Bearer) and per-response status counting for /v1 paths."""

    def __init__(self, app, api_key: str | None, metrics: Metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics
        self._key = api_key.encode("utf-8") if api_key else b""

    def _authorized(self, scope) -> bool:
        """Byte-exact, constant-time: the header's raw bytes against the key's UTF-8 bytes."""
        for k, v in scope.get("headers", ()):
            if k == b"authorization":
                scheme, _, token = v.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(b" \t"), self._key)
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        counted = path.startswith("/v1/")
        if self.api_key and path not in OPEN_PATHS and not self._authorized(scope):
            err = APIError(401, "Invalid or missing API key. Send 'Authorization: Bearer <key>'.",
                           param=None, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            if counted:
                self.metrics.count_response(401)
            return await err.response()(scope, receive, send)
        status = [500]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if counted:
                self.metrics.count_response(status[0])


def body_too_large_message(max_bytes: int) -> str:
    return f"The request body is too large: this server accepts at most {max_bytes} bytes."


class BodyTooLarge(StarletteHTTPException):
    """The request body passed the server's limit while it was being read (FastAPI lets HTTPExceptions through)."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, body_too_large_message(max_bytes))


class BodyLimitMiddleware:
    """Pure ASGI middleware: a 413 for a body over ``max_bytes``, before any of it is parsed.

    A Content-Length over the limit is refused before one byte is read; a body without one (chunked) is
    counted as it arrives and refused as soon as it passes the limit.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _error(self) -> APIError:
        return APIError(413, body_too_large_message(self.max_bytes), code="request_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for k, v in scope.get("headers", ()):
            if k == b"content-length" and v.strip().isdigit() and int(v) > self.max_bytes:
                return await self._error().response()(scope, receive, send)
        seen, started = 0, False

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def send_wrapper(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, send_wrapper)
        except BodyTooLarge:
            if not started:
                await self._error().response()(scope, receive, send)


class SSEResponse(StreamingResponse):
    """A text/event-stream response that runs ``on_close`` however it ends (done, error, client gone)."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def prometheus_text(snap: dict) -> str:
    lines = []

    def metric(name: str, value: Any, help_: str, typ: str = "gauge", labels: str = "") -> None:
        lines.append(f"# HELP casspec_{name} {help_}")
        lines.append(f"# TYPE casspec_{name} {typ}")
        lines.append(f"casspec_{name}{labels} {float(value):.6g}")

    r, t, g = snap["requests"], snap["tokens"], snap["generation"]
    metric("requests_total", r["total"], "HTTP requests to /v1 endpoints", "counter")
    lines += ["# HELP casspec_responses_total /v1 responses by HTTP status", "# TYPE casspec_responses_total counter"]
    for status, n in r["by_status"].items():
        lines.append(f'casspec_responses_total{{status="{status}"}} {n}')
    metric("rejected_queue_full_total", r["rejected_queue_full"], "requests refused with 429", "counter")
    metric("timeouts_total", r["timeouts"], "requests that timed out", "counter")
    metric("cancelled_total", r["cancelled"], "generations cancelled by client disconnects", "counter")
    metric("queue_waiting", snap["queue"]["waiting"], "requests waiting for the engine")
    metric("generation_errors_total", g["errors"], "generations that failed through the server's fault", "counter")
    metric("worker_restarts_total", snap.get("worker", {}).get("restarts", 0),
           "times the worker thread crashed and restarted with a clean state", "counter")
    metric("prompt_tokens_total", t["prompt"], "prompt tokens processed", "counter")
    metric("prompt_tokens_cached_total", t.get("prompt_cached", 0), "prompt tokens whose KV came from the prefix "
           "cache", "counter")
    metric("completion_tokens_total", t["completion"], "tokens generated", "counter")
    metric("generation_seconds_total", g["time_s"], "seconds spent generating", "counter")
    metric("tokens_per_second", g["tokens_per_s"], "completion tokens per generation second")
    metric("mean_accepted_length", g["mean_accepted_length"], "tokens committed per verification step")
    lines += ["# HELP casspec_drafter_acceptance accepted / proposed draft tokens", "# TYPE casspec_drafter_acceptance gauge"]
    for name, d in snap["drafters"].items():
        lines.append(f'casspec_drafter_acceptance{{drafter="{name}"}} {d["acceptance"]:.6g}')
    return "\n".join(lines) + "\n"
