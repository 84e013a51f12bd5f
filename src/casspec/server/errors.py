"""OpenAI-style error bodies for every failure: FastAPI handlers and generation-error mapping."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import CasspecError, ContextOverflowError, GenerationError, ModelNotFoundError
from .http import APIError, loc_param, short
from .worker import JobTimeoutError

log = logging.getLogger("casspec.server")


def map_error(exc: BaseException, chat: bool, request_timeout: float) -> APIError:
    """The API error a failed (or timed-out) generation answers with."""
    param = "messages" if chat else "prompt"
    if isinstance(exc, JobTimeoutError):
        return APIError(504, f"The request timed out after {request_timeout:g} s ({exc}).",
                        type="timeout_error", code="timeout")
    if isinstance(exc, ContextOverflowError):
        return APIError(400, short(exc, 500), param=param, code="context_length_exceeded")
    if isinstance(exc, ModelNotFoundError):
        return APIError(404, short(exc, 500), param="model", code="model_not_found")
    if isinstance(exc, CasspecError):  # casspec's own request errors only: any other ValueError is a 500
        return APIError(400, short(exc, 500), param=None, code="invalid_request")
    if type(exc).__name__.endswith("TemplateError"):  # jinja2 chat-template raise_exception
        return APIError(400, f"The chat template rejected the messages: {short(exc, 400)}", param="messages",
                        code="invalid_messages")
    log.error("generation failed: %r", exc, exc_info=exc)
    if isinstance(exc, GenerationError):  # this request alone failed; its message is meant for the client
        return APIError(500, f"The generation failed: {short(exc, 300)}. Other requests were not affected.",
                        type="server_error", code="generation_failed")
    return APIError(500, "Internal error while generating; the server keeps serving (details in its log).",
                    type="server_error")


def validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's 422 validation errors as one OpenAI-style 400."""
    errors = list(exc.errors())
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, "We could not parse the JSON body of your request: "
                             f"{short(first.get('ctx', {}).get('error', first.get('msg', 'invalid JSON')))}",
                        code="invalid_json")
    if not loc and first.get("type") == "missing":
        return APIError(400, "The request body must be a JSON object.", code="invalid_body")
    if not loc and first.get("type") in ("model_attributes_type", "dict_type", "model_type"):
        return APIError(400, "The request body must be a JSON object (Content-Type: application/json).",
                        code="invalid_body")
    msgs: list[str] = []
    for e in errors:
        m = f"'{loc_param(e.get('loc', ())) or 'body'}': {e.get('msg', 'invalid value')}"
        if m not in msgs:
            msgs.append(m)
    more = f" (and {len(msgs) - 3} more)" if len(msgs) > 3 else ""
    return APIError(400, short("Invalid request: " + "; ".join(msgs[:3]) + more, 600),
                    param=loc_param(first.get("loc", ())), code="invalid_value")


def http_error(request: Request, exc: StarletteHTTPException) -> APIError:
    """Starlette's routing errors (404, 405, unreadable body) in the OpenAI shape."""
    if exc.status_code == 404:
        msg = f"Unknown request URL: {request.method} {request.url.path}."
    elif exc.status_code == 405:
        msg = f"Method {request.method} is not allowed for {request.url.path}."
    elif exc.status_code == 413:  # BodyLimitMiddleware: the body passed the limit while it was read
        return APIError(413, short(exc.detail), code="request_too_large")
    elif exc.status_code == 400:  # FastAPI could not read the body (encoding, form data...)
        return APIError(400, f"We could not parse the body of your request ({short(exc.detail, 200)}); send a "
                             "JSON object with Content-Type: application/json.", code="invalid_json")
    else:
        msg = short(exc.detail)
    typ = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return APIError(exc.status_code, msg, type=typ, code=None, headers=getattr(exc, "headers", None))


def install_error_handlers(app: FastAPI) -> None:
    """Every error, validation and routing ones included, gets the OpenAI body."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return http_error(request, exc).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return APIError(500, "Internal server error (details in the server's log).", type="server_error").response()
