"""Pydantic request models for the OpenAI-compatible endpoints (published in the OpenAPI schema).

Types are strict (no "1" -> 1 or true -> 1 coercion, no NaN/inf) so that wrongly typed fields give a 400, as with
OpenAI. Unknown fields are ignored, like OpenAI does. Parameters that are recognised but not supported
(n>1, best_of, echo, suffix, penalties, logit_bias, tools...) are declared so the schema shows
them, and are refused with a 400 that names them (see ``app._reject_unsupported``).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, StrictBool, StrictInt, StrictStr

Float = Annotated[float, Strict(), Field(allow_inf_nan=False)]
Int64 = Annotated[int, Strict(), Field(ge=-(2**63), le=2**64 - 1)]
StopType = StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None


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
    stop: StopType = Field(None, description="Up to 4 non-empty stop strings (not included in the output).")
    n: StrictInt | None = Field(None, ge=1, le=128, description="Only n=1 is supported.")
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: Float | None = Field(None, ge=-2.0, le=2.0, description="Only 0 is supported.")
    frequency_penalty: Float | None = Field(None, ge=-2.0, le=2.0, description="Only 0 is supported.")
    logit_bias: dict[str, Float] | None = Field(None, description="Not supported (must be empty).")
    user: StrictStr | None = None


class CompletionRequest(_Sampling):
    prompt: StrictStr | Annotated[list[StrictStr], Field(max_length=128)] = Field(
        ..., description="A non-empty string (or a list holding exactly one string). Token-id prompts are not supported."
    )
    max_tokens: StrictInt | None = Field(None, ge=1, description="Default 16 (as OpenAI); at most the server's limit.")
    logprobs: StrictInt | None = Field(None, ge=0, le=20, description="Logprob of each token plus this many top "
                                       "alternatives, from the target model's own logits.")
    echo: StrictBool | None = Field(None, description="Not supported.")
    best_of: StrictInt | None = Field(None, ge=1, le=128, description="Only 1 is supported.")
    suffix: StrictStr | None = Field(None, description="Not supported.")


class ContentPart(_Base):
    type: StrictStr
    text: StrictStr | None = None


class ChatMessage(_Base):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | Annotated[list[ContentPart], Field(max_length=256)] | None = None
    name: StrictStr | None = None


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(max_length=4096)] = Field(
        ..., description="A non-empty list of messages, rendered with the model's chat template."
    )
    max_tokens: StrictInt | None = Field(None, ge=1, description="Default min(256, server limit).")
    max_completion_tokens: StrictInt | None = Field(None, ge=1, description="Alias of max_tokens.")
    logprobs: StrictBool | None = Field(None, description="Return each token's logprob (the target model's own).")
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20, description="Top alternatives per token (needs logprobs).")
    tools: list[Any] | None = Field(None, description="Not supported.")
    tool_choice: Any | None = Field(None, description="Not supported.")
    functions: list[Any] | None = Field(None, description="Not supported.")
    function_call: Any | None = Field(None, description="Not supported.")
    response_format: dict[str, Any] | None = Field(None, description="Only {'type': 'text'} is supported.")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
