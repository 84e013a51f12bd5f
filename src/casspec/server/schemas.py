"""Pydantic request models for the OpenAI-compatible endpoints (published in the OpenAPI schema).

Types are strict (no "1" -> 1 or true -> 1 coercion, no NaN/inf) so that wrongly typed fields give a 400, as with
OpenAI. Unknown fields are ignored, like OpenAI does. Parameters that are recognised but not supported
(n>1, best_of, echo, suffix, penalties, logit_bias, tools...) are declared so the schema shows
them, and are refused with a 400 that names them (see ``requests.reject_unsupported``).

Schema-valid means accepted: where the server accepts less than the field's type (only n=1, a user message
with some text, top_logprobs only with logprobs...), the published schema says so (``json_schema_extra``),
while validation stays lenient enough for the 400 to name the problem in OpenAI's words. Limits that depend
on the served model (max_tokens, model names, token ids) are added by ``openapi.state_limits``. What the
schema does not say: a prompt longer than the model's context (400 context_length_exceeded, as OpenAI), a
body over the server's --max-body-bytes (413), and a busy server (429).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, StrictBool, StrictInt, StrictStr, model_validator
from pydantic.config import JsonDict

Float = Annotated[float, Strict(), Field(allow_inf_nan=False)]
# The server takes any 64-bit integer; the published schema states the range every JSON client can send exactly
# (doubles hold +-(2^53 - 1)): bounds at 2^63 print as floats, which a property-based client rounded past.
Int64 = Annotated[int, Strict(), Field(ge=-(2**63), le=2**64 - 1,
                                       json_schema_extra={"minimum": -(2**53 - 1), "maximum": 2**53 - 1})]
# Integer fields (token-id prompts included) where a whole float reads as its integer (_Sampling._whole_numbers)
WHOLE_FIELDS = frozenset({"n", "top_k", "seed", "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs",
                          "best_of", "prompt"})


def _whole(value: Any) -> Any:
    """2.0 -> 2 (in lists too): JSON, and so the schema's "integer", does not tell 2.0 from 2."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_whole(v) for v in value]
    return value
MAX_STOP_CHARS = 1000  # characters per stop string
MAX_LOGIT_BIAS = 300  # entries of logit_bias (refused anyway: only {} is supported)
MAX_TOOLS = 128  # tools / functions entries (refused anyway)
# A string holding something other than whitespace (Python's str.isspace set, spelled out so that JSON
# Schema's regex dialect agrees with the server's `text.strip()` check).
NONBLANK = r"[^\t\n\x0b\x0c\r \x1c-\x1f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
StopStr = Annotated[StrictStr, Field(min_length=1, max_length=MAX_STOP_CHARS)]
StopType = StopStr | Annotated[list[StopStr], Field(max_length=4)] | None


def only(schema: dict) -> Callable[[dict], None]:
    """json_schema_extra that states `schema` as a lenient field's accepted values (its type schema replaced)."""
    def edit(field: dict) -> None:
        for key in ("anyOf", "type", "const", "enum", "items", "additionalProperties"):
            field.pop(key, None)
        field.update(schema)
    return edit


def accepts(*options: dict) -> Callable[[dict], None]:
    """`only` these options, or null."""
    return only({"anyOf": [*options, {"type": "null"}]})


NONE_ONLY = only({"enum": ["none", None]})  # tool_choice / function_call: absent or "none"
TokenIds = Annotated[list[Int64], Field(min_length=1, max_length=1 << 20)]
MAX_PROMPTS = 128  # prompts in one completions request (OpenAI's batch: one choice each)


class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Base):
    include_usage: StrictBool | None = None


class _Sampling(_Base):
    model: StrictStr | None = Field(
        None, description="The served model's name (GET /v1/models) or the alias 'casspec'; omitted = the served model."
    )
    temperature: Float | None = Field(None, ge=0.0, le=2.0, description="0 = greedy. Default 1.0 (as OpenAI).")
    top_p: Float | None = Field(None, gt=0.0, le=1.0)
    top_k: StrictInt | None = Field(None, ge=-1, le=1_000_000, description="Extension: 0 or -1 = disabled.")
    min_p: Float | None = Field(None, ge=0.0, le=1.0, description="Extension: keep tokens with p >= min_p * p_max; "
                                "0 = disabled.")
    sampling_rule: Literal["gumbel", "rejection"] | None = Field(
        None, description="Extension: how drafts are verified when sampling. 'gumbel' (default): a seed gives the "
        "same tokens as plain decoding; 'rejection': recursive rejection sampling.")
    seed: Int64 | None = None
    stop: StopType = Field(None, description=f"Up to 4 non-empty stop strings of at most {MAX_STOP_CHARS} characters "
                           "(not included in the output).")
    n: StrictInt | None = Field(None, ge=1, le=128, description="Only n=1 is supported.",
                                json_schema_extra=accepts({"type": "integer", "const": 1}))
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: Float | None = Field(None, ge=-2.0, le=2.0, description="Only 0 is supported.",
                                           json_schema_extra=accepts({"type": "number", "minimum": 0, "maximum": 0}))
    frequency_penalty: Float | None = Field(None, ge=-2.0, le=2.0, description="Only 0 is supported.",
                                            json_schema_extra=accepts({"type": "number", "minimum": 0, "maximum": 0}))
    logit_bias: dict[str, Float] | None = Field(None, max_length=MAX_LOGIT_BIAS, description="Not supported (must be "
                                                "empty).", json_schema_extra=accepts({"type": "object",
                                                                                      "maxProperties": 0}))
    user: StrictStr | None = None

    @model_validator(mode="before")
    @classmethod
    def _whole_numbers(cls, data: Any) -> Any:
        """Whole floats in integer fields become integers (schema-valid); "2" and true stay refused (strict)."""
        if isinstance(data, dict):
            return {k: _whole(v) if k in WHOLE_FIELDS else v for k, v in data.items()}
        return data


class CompletionRequest(_Sampling):
    prompt: (StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_PROMPTS)] | TokenIds
             | Annotated[list[TokenIds], Field(max_length=MAX_PROMPTS)]) = Field(
        ..., description="A non-empty string, a list of token ids, or a list of several of either (one choice "
        "each, `index` in prompt order). Token ids are checked against the model's vocabulary."
    )
    max_tokens: StrictInt | None = Field(None, ge=1, description="Default 16 (as OpenAI); at most the server's limit.")
    logprobs: StrictInt | None = Field(None, ge=0, le=20, description="Logprob of each token plus this many top "
                                       "alternatives, from the target model's own logits.")
    echo: StrictBool | None = Field(None, description="Not supported.",
                                    json_schema_extra=accepts({"type": "boolean", "const": False}))
    best_of: StrictInt | None = Field(None, ge=1, le=128, description="Only 1 is supported.",
                                      json_schema_extra=accepts({"type": "integer", "const": 1}))
    suffix: StrictStr | None = Field(None, description="Not supported.",
                                     json_schema_extra=accepts({"type": "string", "maxLength": 0}))


class ContentPart(_Base):
    """Only text parts are supported."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"required": ["type", "text"]})
    type: StrictStr = Field(json_schema_extra={"const": "text"})
    text: StrictStr | None = Field(None, json_schema_extra=only({"type": "string"}))


_TEXT: JsonDict = {"type": "string", "pattern": NONBLANK}
_USER_TEXT: JsonDict = {"anyOf": [_TEXT, {"type": "array", "contains": {"type": "object", "required": ["text"],
                                                              "properties": {"text": _TEXT}}}]}


class ChatMessage(_Base):
    """A user message must hold some text (not only whitespace)."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={
        "if": {"properties": {"role": {"const": "user"}}},
        "then": {"required": ["content"], "properties": {"content": _USER_TEXT}}})
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | Annotated[list[ContentPart], Field(max_length=256)] | None = None
    name: StrictStr | None = None


class ChatCompletionRequest(_Sampling):
    model_config = ConfigDict(extra="ignore", json_schema_extra={  # top_logprobs needs logprobs: true
        "if": {"required": ["top_logprobs"], "properties": {"top_logprobs": {"type": "integer"}}},
        "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}})
    messages: Annotated[list[ChatMessage], Field(max_length=4096)] = Field(
        ..., description="A non-empty list of messages, rendered with the model's chat template.",
        json_schema_extra={"minItems": 1}
    )
    max_tokens: StrictInt | None = Field(None, ge=1, description="Default min(256, server limit).")
    max_completion_tokens: StrictInt | None = Field(None, ge=1, description="Alias of max_tokens.")
    logprobs: StrictBool | None = Field(None, description="Return each token's logprob (the target model's own).")
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20,
                                           description="Top alternatives per token (needs logprobs).")
    tools: list[Any] | None = Field(None, max_length=MAX_TOOLS, description="Not supported.",
                                    json_schema_extra=accepts({"type": "array", "maxItems": 0}))
    tool_choice: Any | None = Field(None, description="Not supported.", json_schema_extra=NONE_ONLY)
    functions: list[Any] | None = Field(None, max_length=MAX_TOOLS, description="Not supported.",
                                        json_schema_extra=accepts({"type": "array", "maxItems": 0}))
    function_call: Any | None = Field(None, description="Not supported.", json_schema_extra=NONE_ONLY)
    response_format: dict[str, Any] | None = Field(None, description="Only {'type': 'text'} is supported.",
                                                   json_schema_extra=accepts({"type": "object", "properties": {
                                                       "type": {"const": "text"}}}))


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
