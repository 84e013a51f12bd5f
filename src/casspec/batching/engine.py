"""Continuous batching: generations join and leave a running batch between steps.

    batch = BatchEngine(engine, max_batch=8)
    a = batch.submit("Write a haiku", max_new_tokens=64)
    b = batch.submit([{"role": "user", "content": "2+2?"}], chat=True, temperature=0.7, seed=1)
    while batch.busy:
        for gen, chunk in batch.step(): ...        # chunk.result is set on each generation's last chunk

Every generation owns a region of one KV pool, reserved at submit (errors surface then) and placed when
the batch has room; a finished or cancelled generation frees it at once. With the engine's prefix cache, a
prompt still to be computed first takes the KV of its longest cached prefix (looked up again each step,
so requests that share a system prompt with one computing it wait for it rather than compute it again),
a computed prompt is offered to the cache at once, and a closing generation offers all its committed KV.

One bad request never fails the others: when a batched step raises, every generation is rolled back to
where the step found it and stepped again alone; one that fails alone too is closed with finish_reason
"error" and its exception in `gen.error` (BatchEngine.generate raises it); the others go on, with the
output they would have had anyway (each request's tokens do not depend on the batch).
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

import torch

from casspec.batching.step import BatchDecoder, BatchHost
from casspec.generation import Generation
from casspec.metrics import GenerationResult, StreamChunk
from casspec.prompt import Prompt

log = logging.getLogger("casspec.batching")

DEFAULT_POOL_TOKENS = 32768  # KV slots shared by the running generations


class BatchEngine:
    """Runs many generations of one Engine together. Not thread-safe: one thread calls submit and step."""

    def __init__(self, engine: BatchHost, max_batch: int = 8, pool_tokens: int = DEFAULT_POOL_TOKENS) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.engine, self.max_batch = engine, max_batch
        self.kv = engine.runner.new_pool(pool_tokens)
        self.decoder = BatchDecoder(engine)
        self.waiting: deque[Generation] = deque()
        self.running: list[Generation] = []

    @property
    def busy(self) -> bool:
        return bool(self.running or self.waiting)

    def submit(self, prompt: Prompt, method: str = "casspec", tag: object = None, **kwargs: object) -> Generation:
        """Validate and queue a request (arguments as Engine.start); raises on bad input, changing nothing."""
        self.decoder.check_method(method)
        gen = self.engine.start(prompt, method, kv_pool=self.kv, **kwargs)
        gen.tag = tag
        self.waiting.append(gen)
        return gen

    def step(self) -> list[tuple[Generation, StreamChunk]]:
        """Admit, run one batched step, and return every chunk produced (a generation's last carries its result;
        a failed one's has finish_reason "error" and the exception in `gen.error`)."""
        out = [(g, self._close(g, "cancelled")) for g in [*self.running, *self.waiting] if g.cancel.is_set()]
        self._admit()
        for g in self.running:
            if g.prefilling:
                g.reuse_prefix()
        if self.running:
            for g, tokens in self._step_isolated(out).items():
                try:
                    out.append((g, g.push(tokens)))
                except Exception as exc:  # noqa: BLE001 - e.g. a token the tokenizer cannot decode
                    out.append((g, self._fail(g, exc)))
                    continue
                if g.finished:
                    out.append((g, self._close(g)))
            for g in self.running:
                g.offer_prompt()
        return out

    def abort(self) -> list[Generation]:
        """Drop every generation (running and waiting) and free their regions; returns them. Never raises."""
        gens = [*self.running, *self.waiting]
        for g in gens:
            try:
                self._drop(g)
            except Exception:  # noqa: BLE001 - best effort: whoever aborts may rebuild the pool
                log.exception("freeing an aborted generation failed")
        self.running.clear()
        self.waiting.clear()
        return gens

    def generate(self, prompts: list[Prompt], method: str = "casspec", **kwargs: object) -> list[GenerationResult]:
        """Run prompts together to completion; results in prompt order."""
        gens = [self.submit(p, method, **kwargs) for p in prompts]
        results: dict[int, GenerationResult] = {}
        while self.busy:
            for g, chunk in self.step():
                error = getattr(g, "error", None)
                if error is not None:
                    self.abort()
                    raise error
                if chunk.result is not None:
                    results[id(g)] = chunk.result
        return [results[id(g)] for g in gens]

    def _step_isolated(self, out: list[tuple[Generation, StreamChunk]]) -> dict[Generation, list[int]]:
        """decoder.step over the batch; if it raises, each generation again alone (rolled back first).
        A generation that fails alone is closed with its error (appended to `out`)."""
        marks = {g: _Mark.of(g) for g in self.running}
        try:
            return self.decoder.step(self.running)
        except Exception as exc:  # noqa: BLE001 - isolate the request that caused it
            log.warning("a batched step failed (%r); stepping its %d generations one by one", exc, len(marks))
        committed: dict[Generation, list[int]] = {}
        for g in list(self.running):
            marks[g].restore(g)
            try:
                committed.update(self.decoder.step([g]))
            except Exception as exc:  # noqa: BLE001 - this one fails alone: it alone gets the error
                log.error("generation failed alone: %r", exc, exc_info=exc)
                marks[g].restore(g)
                out.append((g, self._fail(g, exc)))
        return committed

    def _fail(self, g: Generation, exc: Exception) -> StreamChunk:
        """Close a generation that failed: finish_reason "error", the exception in `g.error`."""
        g.error = exc
        try:
            return self._close(g, "error")
        except Exception:  # noqa: BLE001 - finishing needs the tokenizer, which may be what failed
            self._drop(g)
            g.state.stats.finish_reason = "error"
            return StreamChunk("", [], GenerationResult("", [], g.state.stats))

    def _drop(self, g: Generation) -> None:
        """Take one generation out of the batch and free its region, without finishing it."""
        for q in (self.running, self.waiting):
            if g in q:
                q.remove(g)
        g.finished = True
        g.drop_prefix()
        self.kv.free(g.state.cache)
        self.decoder.forget(g)

    def _admit(self) -> None:
        """Move waiting generations into the batch, in order, while there are batch places and KV room."""
        while self.waiting and len(self.running) < self.max_batch and self.kv.place(self.waiting[0].state.cache):
            self.running.append(self.waiting.popleft())

    def _close(self, g: Generation, reason: str | None = None) -> StreamChunk:
        """Finish a generation and give back its KV region."""
        if g in self.running:
            self.running.remove(g)
        elif g in self.waiting:
            self.waiting.remove(g)
        g.keep_prefix(release=True)
        self.kv.free(g.state.cache)
        self.decoder.forget(g)
        return g.finish(reason)


@dataclass
class _Mark:
    """Where a generation stood before a step: what rolling a failed step back restores."""

    tokens: int
    cached: int
    logprobs: int
    steps: int
    rng: torch.Tensor | None = None  # the generator's state

    @classmethod
    def of(cls, g: Generation) -> _Mark:
        s = g.state
        rng = s.generator.get_state() if s.generator is not None else None
        return cls(len(s.tokens), s.cache.length, len(s.token_logprobs), len(s.stats.accept_lengths), rng)

    def restore(self, g: Generation) -> None:
        s = g.state
        del s.tokens[self.tokens:], s.token_logprobs[self.logprobs:], s.stats.accept_lengths[self.steps:]
        s.cache.length = self.cached
        if self.rng is not None:
            assert s.generator is not None  # it had one when marked
            s.generator.set_state(self.rng)
