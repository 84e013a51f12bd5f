"""Continuous batching for the server: one worker thread runs a BatchEngine; requests join between steps.

Same contract as the one-at-a-time `worker.FifoWorker` (submit, abandon, busy, waiting, start, stop):
a request becomes a Job; the thread moves queued jobs into the running batch while it has places
(`max_batch`), runs one batched step, and hands each job its chunks with ``loop.call_soon_threadsafe``.
A cancelled job (client gone, timeout) leaves the batch at the next step and frees its KV region; the
others go on. Beyond ``max_batch`` running and ``max_queue`` waiting requests, submit raises QueueFullError.

Faults: a batched step that raises is retried generation by generation inside BatchEngine.step, so only
a request that fails alone ends with an error; every job ends exactly once (cancelled ones included), and
whatever still escapes a step ends the jobs the batch held and resets it (the supervisor in worker.py
restarts the loop itself if anything escapes that).
"""
from __future__ import annotations

import logging
import time
from typing import Any

from casspec.batching import BatchEngine

from ..errors import GenerationError
from .worker import Job, JobTimeoutError, Metrics, QueueFullError, Worker, counts_as_failure

log = logging.getLogger("casspec.server")


class BatchWorker(Worker):
    """Admission + a single worker thread that owns a BatchEngine over the engine."""

    thread_name = "casspec-batch"

    def __init__(self, engine: Any, method: str, max_queue: int, metrics: Metrics, max_batch: int = 8,
                 step_delay: float = 0.0, pool_tokens: int | None = None) -> None:
        self._batch_kw = {"pool_tokens": pool_tokens} if pool_tokens else {}
        self.engine = engine
        self.batch = BatchEngine(engine, max_batch, **self._batch_kw)
        self.batch.decoder.check_method(method)
        self.method, self.max_queue, self.max_batch, self.metrics = method, max_queue, max_batch, metrics
        self.step_delay = step_delay  # testing aid: sleep after each step (simulates a slow model)
        self._running: set[Job] = set()
        super().__init__(engine)

    # -- state ---------------------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return bool(self._running)

    def planner_stats(self) -> dict | None:
        return self.batch.decoder.planner_stats()

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        with self._lock:
            return self._outstanding - len(self._running)

    def _cancel_running(self) -> None:
        for job in self._running:
            job.cancel.set()

    # -- requests ------------------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue ``job`` or raise QueueFullError when the batch is full and ``max_queue`` requests wait."""
        self.start()
        with self._lock:  # count queued + running, not what the worker has picked up yet (it may lag behind)
            if self._outstanding >= self.max_batch + self.max_queue:
                raise QueueFullError(self._outstanding - len(self._running))
            self._outstanding += 1
            job.state = "queued"
            self._inbox.put(job)

    # -- worker --------------------------------------------------------------------------------------------
    def _serve(self) -> None:
        while not self._stopping:
            self._admit(block=not self.batch.busy)
            if not self.batch.busy:
                continue
            try:
                chunks = self.batch.step()  # isolates a failing request itself
            except Exception as exc:  # noqa: BLE001 - outside any one request: end the batch's jobs, go on
                log.exception("batched step failed")
                self.metrics.bump("generation_errors")
                self._reset(exc)
                continue
            for gen, chunk in chunks:
                self._deliver(gen, chunk)
            now = time.monotonic()
            for job in list(self._running):
                if now >= job.deadline:
                    job.cancel.set()
            if self.step_delay:
                time.sleep(self.step_delay)

    def _admit(self, block: bool) -> None:
        """Move queued jobs into the batch while it has places (wait for one when idle)."""
        while len(self.batch.running) + len(self.batch.waiting) < self.max_batch:
            job = self._inbox.get(0.5 if block else 0)
            if job is None:
                return
            block = False
            self._start(job)

    def _start(self, job: Job) -> None:
        with self._lock:  # running before anything else: an abandon from now on leaves the counting to _end
            if job.state == "dropped":
                return
            job.state = "running"
            job.started = time.monotonic()
            self._running.add(job)
        if job.cancel.is_set() or time.monotonic() >= job.deadline:
            self._end(job, ("error", JobTimeoutError("cancelled or timed out before it started")))
            return
        try:
            self.batch.submit(job.req.prompt, self.method, tag=job, cancel=job.cancel, **job.req.kwargs())
        except Exception as exc:  # noqa: BLE001 - handed to the request (400 for its own errors, else 500)
            if counts_as_failure(exc):
                self.metrics.bump("generation_errors")
            self._end(job, ("error", exc))

    def _deliver(self, gen: Any, chunk: Any) -> None:
        job = gen.tag
        self._annotate(chunk.logprobs)
        if chunk.text or chunk.token_ids:
            job.put(("chunk", chunk))
        result = chunk.result
        if result is None:
            return
        self._annotate(result.logprobs)
        stats = result.stats
        if stats.finish_reason == "error":  # failed alone (BatchEngine isolated it)
            exc = getattr(gen, "error", None) or GenerationError("the generation failed")
            if counts_as_failure(exc):
                self.metrics.bump("generation_errors")
            self._end(job, ("error", exc))
        elif stats.finish_reason == "cancelled":
            self.metrics.record(None, stats.new_tokens, stats.wall_time, job.queue_time)
            self._end(job, ("error", JobTimeoutError("cancelled")))
        else:
            self.metrics.record(stats, stats.new_tokens, stats.wall_time, job.queue_time)
            self._end(job, ("done", result))

    def _end(self, job: Job, item: tuple) -> None:
        """Hand over the final item and retire the job (once: a second end is ignored)."""
        with self._lock:
            if job.state == "done":
                return
            if job.state != "dropped":
                self._outstanding -= 1
            job.state = "done"
            self._running.discard(job)
        job.put(item)

    def _reset(self, exc: Exception) -> None:
        """End every job in the batch with `exc` and empty it (a fresh BatchEngine if regions stay held)."""
        self.batch.abort()
        if self.batch.kv.used:
            log.error("the KV pool still holds %d slots after an abort: making a fresh batch engine",
                      self.batch.kv.used)
            self.batch = BatchEngine(self.engine, self.max_batch, **self._batch_kw)
        with self._lock:
            jobs = list(self._running)
        for job in jobs:
            self._end(job, ("error", exc))
