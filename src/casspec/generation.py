"""Generation: one request's decoding state plus the text it streams, for the single-stream and batched paths.

`Engine.start` validates a request and returns a Generation; a decoder commits tokens into its
DecodeState, and `push` turns each step's new tokens into a StreamChunk (text cut at stop strings);
`finish` closes it with the GenerationResult.
"""
from __future__ import annotations

import threading
import time

from casspec.decoder import take
from casspec.metrics import GenerationResult, StreamChunk
from casspec.prompt import TextAssembler
from casspec.state import DecodeState


class Generation:
    """A request in flight: its state, method, text assembler and cancel flag."""

    def __init__(self, state: DecodeState, method: str, text: TextAssembler,
                 cancel: threading.Event | None = None, tag: object = None) -> None:
        self.state, self.method, self.text = state, method, text
        self.cancel = cancel or threading.Event()
        self.tag = tag  # the caller's handle (the server's job)
        self.finished = False
        self.t0 = time.perf_counter()
        self._logprobs_sent = 0

    @property
    def prefilling(self) -> bool:
        """Whether prompt tokens are still waiting for the KV cache."""
        return self.state.cache.length < len(self.state.tokens) - 1

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
        for lp in out:
            lp.text = decode([lp.token])
            lp.top_text = [decode([i]) for i, _ in lp.top]
        return out
