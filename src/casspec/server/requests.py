"""Request validation: OpenAI request bodies -> a GenRequest, or a 400 naming the bad parameter."""
from __future__ import annotations

from typing import Any

from .http import APIError, short
from .worker import GenRequest


def reject_unsupported(body: Any, chat: bool) -> None:
    """400 for OpenAI parameters this server does not implement (rather than silently ignoring them)."""
    bad = [
        ("n", body.n not in (None, 1), "n > 1 is not supported: one choice per request"),
        ("presence_penalty", body.presence_penalty not in (None, 0), "presence_penalty is not supported"),
        ("frequency_penalty", body.frequency_penalty not in (None, 0), "frequency_penalty is not supported"),
        ("logit_bias", bool(body.logit_bias), "logit_bias is not supported"),
    ]
    if chat:
        rf = (body.response_format or {}).get("type", "text")
        bad += [
            ("top_logprobs", body.top_logprobs is not None and not body.logprobs,
             "top_logprobs needs logprobs: true"),
            ("tools", bool(body.tools) or bool(body.functions), "tools / function calling are not supported"),
            ("tool_choice", body.tool_choice not in (None, "none") or body.function_call not in (None, "none"),
             "tool_choice is not supported"),
            ("response_format", rf != "text", "only response_format {'type': 'text'} is supported"),
        ]
    else:
        bad += [
            ("best_of", body.best_of not in (None, 1), "best_of > 1 is not supported"),
            ("echo", bool(body.echo), "echo is not supported"),
            ("suffix", bool(body.suffix), "suffix is not supported"),
        ]
    for param, is_bad, message in bad:
        if is_bad:
            raise APIError(400, message + ".", param=param, code="unsupported_parameter")


def gen_request(body: Any, prompt: Any, chat: bool, max_tokens_limit: int) -> GenRequest:
    """The generation a validated body asks for (OpenAI defaults where fields are omitted)."""
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
        stop=stop, chat=chat, logprobs=_logprobs(body, chat),
        min_p=0.0 if body.min_p is None else float(body.min_p), sampling_rule=body.sampling_rule,
    )


def _logprobs(body: Any, chat: bool) -> int | None:
    """How many top alternatives per token to report, or None when logprobs are off."""
    if chat:
        return (body.top_logprobs or 0) if body.logprobs else None
    return body.logprobs


def completion_prompts(body: Any, vocab_size: int | None = None) -> list[str | list[int]]:
    """The prompts of a completions request, OpenAI's way: a string or a list of token ids is one prompt, a
    list of strings or of token-id lists is several (one choice each). Token ids must be in the vocabulary."""
    prompt = body.prompt
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise APIError(400, "prompt must not be an empty list.", param="prompt", code="invalid_value")
    for i, p in enumerate(prompts):
        where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        if isinstance(p, str) and not p.strip():
            raise APIError(400, f"{where} must not be empty (or only whitespace).", param="prompt",
                           code="empty_prompt")
        bad = next((t for t in p if not 0 <= t < vocab_size), None) if isinstance(p, list) and vocab_size else None
        if bad is not None:
            raise APIError(400, f"{where} holds token id {bad}, outside the model's vocabulary [0, {vocab_size}).",
                           param="prompt", code="invalid_token_id")
    return prompts


def chat_messages(body: Any) -> list[dict[str, str]]:
    """Messages for the chat template: text parts joined, 'developer' read as 'system'."""
    if not body.messages:
        raise APIError(400, "messages must be a non-empty list.", param="messages", code="empty_messages")
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
    return messages
