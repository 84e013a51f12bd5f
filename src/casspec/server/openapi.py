"""The published OpenAPI schema, with the limits of the served model and server added (schema-valid = accepted).

The pydantic models (schemas.py) state what holds for every server; what depends on this one is added
here, once, when /openapi.json is first asked for: the model names it answers to, the largest
``max_tokens``, non-blank prompts and the token-id range of the vocabulary. Prompt length is not stated
(too long a prompt is a 400 context_length_exceeded, as in OpenAI's API): its bound is in tokens, and a
``maxLength`` of tens of thousands would also break property-based fuzzers (hypothesis cannot build
strings that long to violate it).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from .schemas import NONBLANK

MAX_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")


def install_openapi(app: FastAPI, *, model_names: list[str], max_tokens: int, vocab_size: int | None) -> None:
    """Make ``app.openapi()`` return the schema with this server's limits stated."""
    plain = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = plain()
            state_limits(schema.get("components", {}).get("schemas", {}), model_names, max_tokens, vocab_size)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to customise the schema


def state_limits(models: dict, model_names: list[str], max_tokens: int, vocab_size: int | None) -> None:
    """Edit the request models' schemas in place (fields that are not there are skipped)."""
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = models.get(name, {}).get("properties", {})
        if "model" in props:
            props["model"]["enum"] = [*model_names, None]
        for field in MAX_TOKEN_FIELDS:
            if field in props:
                props[field]["maximum"] = max_tokens
    prompt = models.get("CompletionRequest", {}).get("properties", {}).get("prompt")
    if prompt is not None:
        _walk(prompt, lambda s: _prompt_part(s, vocab_size))


def _prompt_part(s: dict, vocab_size: int | None) -> None:
    """A prompt string holds some text; a list holds something; a token id is in the vocabulary."""
    kind = s.get("type")
    if kind == "string":
        s["pattern"] = NONBLANK
    elif kind == "array":
        s["minItems"] = max(1, s.get("minItems", 0))
    elif kind == "integer" and vocab_size:
        s["minimum"], s["maximum"] = 0, vocab_size - 1


def _walk(schema: Any, visit: Callable[[dict], None]) -> None:
    """Call `visit` on every (sub)schema dict: anyOf / oneOf branches and array items included."""
    if not isinstance(schema, dict):
        return
    visit(schema)
    for key in ("anyOf", "oneOf", "allOf"):
        for sub in schema.get(key, ()):
            _walk(sub, visit)
    _walk(schema.get("items"), visit)
