"""Continuous batching for the server: one worker thread runs a BatchEngine; requests join between steps.

Same contract as the one-at-a-time `worker.Scheduler` (submit, abandon, busy, waiting, start, stop):
a request becomes a Job; the thread moves queued jobs into the running batch while it has places
(`max_batch`), runs one batched step, and hands each job its chunks with ``loop.call_soon_threadsafe``.
A cancelled job (client gone, timeout) leaves the batch at the next step and frees its KV region; the
others go on. Beyond ``max_batch`` running and ``max_queue`` waiting requests, submit raises QueueFullError.
"""
from __future__ import annotations

import logging
import queue
import time
from typing import Any

from casspec.batching import BatchEngine

from .worker import Job, JobTimeoutError, Metrics, QueueFullError, _Worker

log = logging.getLogger("casspec.server")


class BatchScheduler(_Worker):
    """Admission + a single worker thread that owns a BatchEngine over the engine."""

    thread_name = "casspec-batch"

    def __init__(self, engine: Any, method: str, max_queue: int, metrics: Metrics, max_batch: int = 8,
                 step_delay: float = 0.0, pool_tokens: int | None = None) -> None:
        self.batch = BatchEngine(engine, max_batch, **({"pool_tokens": pool_tokens} if pool_tokens else {}))
        self.batch.decoder.check_method(method)
        self.method, self.max_queue, self.max_batch, self.metrics = method, max_queue, max_batch, metrics
        self.step_delay = step_delay  # testing aid: sleep after each step (simulates a slow model)
        self._inbox: queue.Queue[Job | None] = queue.Queue()
        self._running: set[Job] = set()
        super().__init__()

    # -- state ---------------------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return bool(self._running)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        with self._lock:
            return self._outstanding - len(self._running)

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._stopping = True
            thread = self._thread
            for job in self._running:
                job.cancel.set()
        self._inbox.put(None)
        if thread is not None:
            thread.join(timeout)

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
    def _loop(self) -> None:
        while not self._stopping:
            self._admit(block=not self.batch.busy)
            if not self.batch.busy:
                continue
            try:
                chunks = self.batch.step()
            except Exception as exc:  # never let the worker die: fail this batch, keep serving
                log.exception("batched step failed")
                self._fail_all(exc)
                continue
            for gen, chunk in chunks:
                self._deliver(gen.tag, chunk)
            now = time.monotonic()
            for job in list(self._running):
                if now >= job.deadline:
                    job.cancel.set()
            if self.step_delay:
                time.sleep(self.step_delay)

    def _admit(self, block: bool) -> None:
        """Move queued jobs into the batch while it has places (wait for one when idle)."""
        while len(self.batch.running) + len(self.batch.waiting) < self.max_batch:
            try:
                job = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                return
            if job is None or job.state == "dropped":
                if self._stopping:
                    return
                continue
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
        except Exception as exc:
            if not isinstance(exc, ValueError):  # ValueError = casspec's bad-request errors (a 400)
                self.metrics.bump("generation_errors")
            self._end(job, ("error", exc))

    def _deliver(self, job: Job, chunk: Any) -> None:
        if chunk.text or chunk.token_ids:
            job.put(("chunk", chunk))
        result = chunk.result
        if result is None:
            return
        if result.stats.finish_reason == "cancelled":
            self.metrics.record(None, result.stats.new_tokens, result.stats.wall_time, job.queue_time)
            self._end(job, ("error", JobTimeoutError("cancelled")))
        else:
            self.metrics.record(result.stats, result.stats.new_tokens, result.stats.wall_time, job.queue_time)
            self._end(job, ("done", result))

    def _end(self, job: Job, item: tuple) -> None:
        """Hand over the final item and retire the job."""
        job.put(item)
        with self._lock:
            if job.state != "dropped":
                self._outstanding -= 1
            job.state = "done"
            self._running.discard(job)

    def _fail_all(self, exc: Exception) -> None:
        self.metrics.bump("generation_errors")
        for gen in [*self.batch.running, *self.batch.waiting]:
            gen.cancel.set()
        for gen, _ in self.batch.step():  # closes every cancelled generation, freeing its region
            self._end(gen.tag, ("error", exc))
