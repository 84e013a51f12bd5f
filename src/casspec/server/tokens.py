"""The exact bytes of each token, for the `bytes` field of chat logprobs.

`tokenizer.decode([id])` of a token that holds part of a multi-byte UTF-8 character reads U+FFFD, whose
bytes are not the token's. The bytes come from the token's own piece instead: byte-level BPE pieces
(GPT-2, SmolLM2, Qwen) map each character back to one byte; SentencePiece pieces spell byte-fallback
tokens as ``<0xE2>`` and spaces as U+2581. Special tokens (and tokenizers of another kind) use their text.
Runs in the worker thread only (the event loop never touches the tokenizer).
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character -> the byte it stands for."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def _kind(tokenizer: Any) -> str:
    """"bytelevel", "sentencepiece" or "text" (decode each token alone)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "text"
    spec = backend.to_str()
    if '"ByteLevel"' in spec:
        return "bytelevel"
    return "sentencepiece" if "\u2581" in spec or "ByteFallback" in spec else "text"


class TokenBytes:
    """token id -> its exact bytes (cached; a few hundred bytes per distinct token seen)."""

    def __init__(self, tokenizer: Any, eos_ids: Any = ()) -> None:
        self.tokenizer = tokenizer
        self.kind = _kind(tokenizer)
        self.special = set(getattr(tokenizer, "all_special_ids", ()) or ())
        self.eos_ids = frozenset(eos_ids or ())
        self._cache: dict[int, bytes] = {}

    def __call__(self, token: int) -> bytes:
        out = self._cache.get(token)
        if out is None:
            out = self._cache[token] = self._bytes(token)
        return out

    def _bytes(self, token: int) -> bytes:
        piece = None if token in self.special else self.tokenizer.convert_ids_to_tokens(token)
        if isinstance(piece, str):
            m = _BYTE_PIECE.fullmatch(piece)
            if m is not None and self.kind == "sentencepiece":
                return bytes([int(m.group(1), 16)])
            table = byte_decoder()
            if self.kind == "bytelevel" and all(c in table for c in piece):
                return bytes(table[c] for c in piece)
            if self.kind == "sentencepiece":
                return piece.replace("\u2581", " ").encode("utf-8")
        return self.tokenizer.decode([token]).encode("utf-8")

    def annotate(self, logprobs: list | None) -> None:
        """Set `.bytes`, `.top_bytes` and `.eos` on each TokenLogprob (read by the response builder)."""
        for lp in logprobs or ():
            if getattr(lp, "bytes", None) is None:
                lp.bytes = self(lp.token)
                lp.top_bytes = [self(i) for i, _ in lp.top]
                lp.eos = lp.token in self.eos_ids
