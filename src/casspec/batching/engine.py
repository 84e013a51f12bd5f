"""Continuous batching: generations join and leave a running batch between steps.

    batch = BatchEngine(engine, max_batch=8)
    a = batch.submit("Write a haiku", max_new_tokens=64)
    b = batch.submit([{"role": "user", "content": "2+2?"}], chat=True, temperature=0.7, seed=1)
    while batch.busy:
        for gen, chunk in batch.step(): ...        # chunk.result is set on each generation's last chunk

Every generation owns a region of one KV pool, reserved at submit (errors surface then) and placed when
the batch has room; a finished or cancelled generation frees it at once.
"""
from __future__ import annotations

from collections import deque

from casspec.batching.step import BatchDecoder
from casspec.generation import Generation
from casspec.metrics import GenerationResult, StreamChunk
from casspec.prompt import Prompt

DEFAULT_POOL_TOKENS = 32768  # KV slots shared by the running generations


class BatchEngine:
    """Runs many generations of one Engine together. Not thread-safe: one thread calls submit and step."""

    def __init__(self, engine: object, max_batch: int = 8, pool_tokens: int = DEFAULT_POOL_TOKENS) -> None:
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
        """Admit, run one batched step, and return every chunk produced (a generation's last carries its result)."""
        out = [(g, self._close(g, "cancelled")) for g in [*self.running, *self.waiting] if g.cancel.is_set()]
        self._admit()
        if self.running:
            for g, tokens in self.decoder.step(self.running).items():
                out.append((g, g.push(tokens)))
                if g.finished:
                    out.append((g, self._close(g)))
        return out

    def generate(self, prompts: list[Prompt], method: str = "casspec", **kwargs: object) -> list[GenerationResult]:
        """Run prompts together to completion; results in prompt order."""
        gens = [self.submit(p, method, **kwargs) for p in prompts]
        results: dict[int, GenerationResult] = {}
        while self.busy:
            for g, chunk in self.step():
                if chunk.result is not None:
                    results[id(g)] = chunk.result
        return [results[id(g)] for g in gens]

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
        self.kv.free(g.state.cache)
        self.decoder.forget(g)
        return g.finish(reason)
