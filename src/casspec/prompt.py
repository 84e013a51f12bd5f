"""Prompt encoding (raw text, chat messages or token ids) and incremental detokenization with stop strings."""
from __future__ import annotations

from typing import TypeGuard, cast

from transformers import PreTrainedTokenizerBase

from casspec.errors import InvalidRequestError

Prompt = str | list[dict] | list[int]


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, chat: bool | None = None,
                  vocab_size: int | None = None) -> list[int]:
    """Token ids for a raw prompt, for chat messages through the model's chat template, or token ids as
    they are (checked against `vocab_size`, default the tokenizer's)."""
    if is_token_ids(prompt):
        return check_token_ids(prompt, len(tokenizer) if vocab_size is None else vocab_size, chat)
    if isinstance(prompt, str):
        if not prompt.strip():
            raise InvalidRequestError("prompt is empty")
        if not chat:
            return list(tokenizer(prompt).input_ids)
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise InvalidRequestError("prompt must be a non-empty string, or a non-empty list of chat messages "
                                  "or of token ids")
    if not _is_messages(prompt):
        raise InvalidRequestError("each chat message must be {'role': str, 'content': str}")
    if not all(m["content"].strip() for m in prompt if m["role"] == "user") :
        raise InvalidRequestError("chat messages have an empty user message")
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("this model has no chat template: pass a plain text prompt")
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def _is_messages(prompt: list) -> TypeGuard[list[dict]]:
    return all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
               for m in prompt)


def is_token_ids(prompt: object) -> TypeGuard[list]:
    """Whether a prompt is given as token ids (a non-empty list whose first item is an int)."""
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], int)


def check_token_ids(ids: list, vocab_size: int, chat: bool | None = None) -> list[int]:
    """The ids of a token-id prompt, or InvalidRequestError naming the first bad one."""
    if chat:
        raise InvalidRequestError("a token-id prompt is used as it is: chat templates apply to messages only")
    for i, t in enumerate(ids):
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size:
            raise InvalidRequestError(f"prompt token {i} is {t!r}: token ids must be integers in [0, {vocab_size})")
    return list(ids)


class TextAssembler:
    """Turns committed token ids into stable text chunks, cutting at the first stop string."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: list[str]) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.hold = max((len(s) for s in stops), default=1) - 1  # chars held back while a stop may be forming
        self.token_ids: list[int] = []
        self.text = ""
        self._emitted = 0

    def _decode(self, ids: list[int]) -> str:
        return cast(str, self.tokenizer.decode(ids, skip_special_tokens=True))  # (typed str | list[str])

    def _find_stop(self, text: str) -> int:
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(hits) if hits else -1

    def add(self, new: list[int]) -> tuple[str, list[int], bool]:
        """Append tokens; return (text to emit now, tokens kept, whether a stop string ended generation)."""
        text = self._decode(self.token_ids + new)
        cut = self._find_stop(text) if self.stops else -1
        if cut >= 0:  # keep tokens up to the one that completed the stop string, like plain decoding
            m = next(m for m in range(1, len(new) + 1) if self._find_stop(self._decode(self.token_ids + new[:m])) >= 0)
            new, text = new[:m], text[:cut]
        self.token_ids += new
        self.text = text
        stable = len(text) if cut >= 0 else len(text.rstrip("\ufffd")) - self.hold
        piece = text[self._emitted:max(stable, self._emitted)]
        self._emitted += len(piece)
        return piece, new, cut >= 0

    def flush(self) -> str:
        """Whatever text is still held back."""
        piece = self.text[self._emitted:]
        self._emitted = len(self.text)
        return piece
