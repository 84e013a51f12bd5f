"""Generation: one request's decoding state plus the text it streams, for the single-stream and batched paths.

`Engine.start` validates a request and returns a Generation; a decoder commits tokens into its
DecodeState, and `push` turns each step's new tokens into a StreamChunk (text cut at stop strings);
`finish` closes it with the GenerationResult. With a prefix cache, `reuse_prefix` takes the KV of the
longest cached prefix of the prompt before it is computed, and `keep_prefix` offers the committed tokens'
KV back (when the prompt is computed, and when the request ends: then its pin is released).
"""
from __future__ import annotations

import threading
import time
from typing import cast

from casspec.decoder import take
from casspec.metrics import GenerationResult, StreamChunk
from casspec.prompt import TextAssembler
from casspec.runtime.prefix_cache import Pin, PrefixCache
from casspec.state import DecodeState


class Generation:
    """A request in flight: its state, method, text assembler and cancel flag."""

    error: Exception  # set only on a generation that failed in a batch (BatchEngine)

    def __init__(self, state: DecodeState, method: str, text: TextAssembler,
                 cancel: threading.Event | None = None, tag: object = None,
                 prefix: PrefixCache | None = None) -> None:
        self.state, self.method, self.text = state, method, text
        self.prefix = prefix  # the engine's prefix cache (None: no reuse)
        self._pin: Pin | None = None  # cached nodes this request's KV came from
        self._offered = 0  # committed tokens already offered to the prefix cache
        self.cancel = cancel or threading.Event()
        self.tag = tag  # the caller's handle (the server's job)
        self.finished = False
        self.t0 = time.perf_counter()
        self._logprobs_sent = 0

    @property
    def prefilling(self) -> bool:
        """Whether prompt tokens are still waiting for the KV cache."""
        return self.state.cache.length < len(self.state.tokens) - 1

    def reuse_prefix(self) -> int:
        """Take the KV of the longest cached prefix of the prompt, if longer than what the cache holds
        (its region must be placed); returns the tokens cached now."""
        st = self.state
        if self.prefix is not None and self.prefilling and st.cache.placed:
            before = st.cache.length
            self._pin = self.prefix.restore(st.tokens, st.cache, self._pin)
            if st.cache.length > before:
                st.stats.cached_tokens = st.cache.length
        return st.cache.length

    def keep_prefix(self, release: bool = False) -> None:
        """Offer the committed tokens' KV to the prefix cache; `release` (the request ends): unpin."""
        if self.prefix is None:
            return
        cache = self.state.cache
        if cache.placed and cache.length > self._offered:
            self.prefix.insert(self.state.tokens, cache)
            self._offered = cache.length
        if release:
            self.prefix.release(self._pin)
            self._pin = None

    def offer_prompt(self) -> None:
        """Once the prompt is computed, offer its KV (requests arriving while this one decodes then reuse it)."""
        if self._offered == 0 and not self.prefilling:
            self.keep_prefix()

    def drop_prefix(self) -> None:
        """Unpin without offering anything (a failed request: its KV is not trusted)."""
        if self.prefix is not None:
            self.prefix.release(self._pin)
        self._pin = None

    def push(self, committed: list[int]) -> StreamChunk:
        """Stream the tokens one step committed (budget, EOS and stop strings applied)."""
        new, done = take(self.state, committed)
        piece, new, stopped = self.text.add(new)
        if stopped:
            self.state.stats.finish_reason = "stop"
        self.finished = done or stopped
        self.state.stats.wall_time = time.perf_counter() - self.t0
        return StreamChunk(piece, new, logprobs=self._logprobs(len(new)))

    def finish(self, reason: str | None = None) -> StreamChunk:
        """The last chunk: held-back text and the GenerationResult (`reason` overrides, e.g. "cancelled")."""
        self.finished = True
        s = self.state.stats
        if reason is not None:
            s.finish_reason = reason
        s.wall_time = time.perf_counter() - self.t0
        s.new_tokens = len(self.text.token_ids)
        lps = None
        if self.state.logprobs is not None:
            self._logprobs(len(self.text.token_ids) - self._logprobs_sent)  # texts of any not streamed yet
            lps = self.state.token_logprobs[:len(self.text.token_ids)]
        return StreamChunk(self.text.flush(), [], GenerationResult(self.text.text, self.text.token_ids, s, lps))

    def _logprobs(self, n: int) -> list | None:
        if self.state.logprobs is None:
            return None
        out = self.state.token_logprobs[self._logprobs_sent:self._logprobs_sent + n]
        self._logprobs_sent += n
        decode = self.text.tokenizer.decode
        for lp in out:  # (decode of one id list is a str; transformers types it str | list[str])
            lp.text = cast(str, decode([lp.token]))
            lp.top_text = [cast(str, decode([i])) for i, _ in lp.top]
        return out
