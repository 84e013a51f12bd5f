"""One engine, one worker thread: generations run one at a time, FIFO, outside the event loop.

The event loop never touches the engine (not even its tokenizer). A request becomes a :class:`Job`;
the worker thread runs ``engine.iter_generate`` for it and hands items back to the request's asyncio
queue with ``loop.call_soon_threadsafe``. Items are ``("chunk", StreamChunk)``, ``("done", result)`` and
``("error", exception)``; exactly one ``done``/``error`` ends a job that ran. Setting ``job.cancel``
(client gone, timeout) stops the generation after the current step and frees the engine.

The thread cannot die: a supervisor loop catches whatever escapes serving, logs it, counts it
(/metrics worker.restarts), ends the jobs it held with an error, and serves again from a clean state.
A job dropped while queued leaves the queue at once (its prompt is not kept until the worker looks).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from ..errors import CasspecError, GenerationError
from ..runtime.threads import release_openmp_pool
from .metrics import Metrics
from .tokens import TokenBytes

__all__ = ["GenRequest", "Job", "JobTimeoutError", "Metrics", "QueueFullError", "FifoWorker", "Worker", "WorkerCrashError"]

log = logging.getLogger("casspec.server")


class QueueFullError(Exception):
    """More than ``max_queue`` requests are already waiting."""


class JobTimeoutError(Exception):
    """The request ran past its deadline (raised in the worker for a job that timed out while queued)."""


class WorkerCrashError(GenerationError):
    """The worker thread crashed while it held this request (it restarted; the request is lost)."""


@dataclass
class GenRequest:
    """Arguments for one ``engine.iter_generate`` call."""

    prompt: Any  # str (raw text) or list of {"role", "content"} dicts (chat template)
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] | None = None
    chat: bool = False
    logprobs: int | None = None  # None: none; k: each token's logprob and the k most likely alternatives
    min_p: float = 0.0
    sampling_rule: str | None = None  # None: the engine's default ("gumbel")

    def kwargs(self) -> dict:
        kw: dict[str, Any] = dict(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                  top_k=self.top_k, seed=self.seed, stop=self.stop, chat=self.chat)
        # only when set: engines without these options keep working
        for name, value in (("logprobs", self.logprobs), ("min_p", self.min_p or None),
                            ("sampling_rule", self.sampling_rule)):
            if value is not None:
                kw[name] = value
        return kw


class Job:
    """One request's generation: its arguments, its cancel Event and the asyncio queue it reads."""

    def __init__(self, req: GenRequest, loop: asyncio.AbstractEventLoop, timeout: float):
        self.req = req
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancel = threading.Event()
        self.created = time.monotonic()
        self.deadline = self.created + timeout
        self.started: float | None = None  # monotonic time the worker picked it up
        self.state = "new"  # new -> queued -> running -> done | dropped
        self.finished = False  # the handler received the final item
        self.checked = self.created  # last time the handler polled for a client disconnect
        self._getter: asyncio.Task | None = None

    @property
    def queue_time(self) -> float:
        return (self.started or time.monotonic()) - self.created

    def put(self, item: tuple) -> None:
        """Thread-safe hand-off to the request's event loop (no-op once that loop is closed)."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # loop closed: nobody is listening any more
            self.cancel.set()

    async def next(self, timeout: float) -> tuple | None:
        """The next item, or None after ``timeout`` seconds (an item is never lost to a timeout)."""
        if self._getter is None:
            self._getter = asyncio.ensure_future(self.queue.get())
        done, _ = await asyncio.wait({self._getter}, timeout=max(timeout, 0.0))
        if not done:
            return None
        task, self._getter = self._getter, None
        return task.result()

    def drop_getter(self) -> None:
        if self._getter is not None:
            self._getter.cancel()
            self._getter = None


class _Inbox:
    """FIFO of queued jobs that a dropped job leaves at once."""

    def __init__(self) -> None:
        self._jobs: deque[Job] = deque()
        self._cv = threading.Condition()
        self._woken = False

    def __len__(self) -> int:
        return len(self._jobs)

    def put(self, job: Job) -> None:
        with self._cv:
            self._jobs.append(job)
            self._cv.notify()

    def get(self, timeout: float | None) -> Job | None:
        """The oldest job, or None after `timeout` seconds (0: no wait; None: until one comes) or a wake()."""
        with self._cv:
            if not self._jobs and not self._woken and timeout != 0:
                self._cv.wait(timeout)
            self._woken = False
            return self._jobs.popleft() if self._jobs else None

    def remove(self, job: Job) -> None:
        with self._cv:
            if job in self._jobs:
                self._jobs.remove(job)

    def wake(self) -> None:
        with self._cv:
            self._woken = True
            self._cv.notify_all()


def token_bytes(engine: Any) -> TokenBytes | None:
    """The engine's token -> bytes table, or None for an engine without a tokenizer (test fakes)."""
    tokenizer = getattr(engine, "tokenizer", None)
    return None if tokenizer is None else TokenBytes(tokenizer, getattr(engine, "eos_ids", ()))


def counts_as_failure(exc: BaseException) -> bool:
    """Whether a generation error is the server's (counted in /metrics), not the request's."""
    return not isinstance(exc, (CasspecError, JobTimeoutError))


class Worker:
    """What both workers share: admission counting, the inbox, the supervised worker thread, abandoning a job."""

    thread_name = "casspec-worker"
    metrics: Metrics  # set by each worker's own __init__
    max_batch = 1  # requests decoded together (the batch worker sets its own)

    # -- what app.py and service.py read (each worker defines these) ---------------------------------------
    @property
    def busy(self) -> bool:
        raise NotImplementedError

    @property
    def waiting(self) -> int:
        """Requests admitted and not yet running."""
        raise NotImplementedError

    @property
    def running(self) -> int:
        return int(self.busy)

    def submit(self, job: Job) -> None:
        raise NotImplementedError

    def planner_stats(self) -> dict | None:
        """The batch planner's own time per step (None: this worker does not batch)."""
        return None

    def __init__(self, engine: Any) -> None:
        self._lock = threading.Lock()
        self._outstanding = 0  # queued + running
        self._inbox = _Inbox()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.token_bytes = token_bytes(engine)

    @property
    def alive(self) -> bool:
        return self._thread is None or self._thread.is_alive()

    def start(self) -> None:
        """Start the worker thread (again, from a clean state, if it died: it should never)."""
        with self._lock:
            thread = self._thread
            if thread is not None and thread.is_alive():
                return
            died = thread is not None and not self._stopping
        if died:
            log.error("the %s thread is gone; starting a new one from a clean state", self.thread_name)
            self.metrics.bump("worker_restarts")
            self._reset(WorkerCrashError("the server's worker thread died while it held this request"))
        with self._lock:
            if self._thread is thread:  # nobody started one meanwhile
                self._stopping = False
                release_openmp_pool()  # this thread's pool would halve the worker's speed (runtime/threads.py)
                self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._stopping = True
            thread = self._thread
            self._cancel_running()
        self._inbox.wake()
        if thread is not None:
            thread.join(timeout)

    def abandon(self, job: Job) -> bool:
        """Stop ``job`` (cancel it, or drop it from the queue). Returns True if it had not finished."""
        job.cancel.set()
        job.drop_getter()
        with self._lock:
            if job.state == "queued":
                job.state = "dropped"
                self._outstanding -= 1
                self._inbox.remove(job)  # its prompt goes now, not when the worker gets to it
                return True
            return job.state == "running" and not job.finished

    def _loop(self) -> None:
        """The supervisor: serve; whatever escapes is logged and counted, the state reset, and serving goes on."""
        while not self._stopping:
            try:
                self._serve()
            except BaseException as exc:  # noqa: BLE001 - the thread must not die
                log.exception("the %s worker crashed; restarting it with a clean state", self.thread_name)
                self.metrics.bump("worker_restarts")
                try:
                    self._reset(WorkerCrashError(f"the server's worker failed ({type(exc).__name__}) while it "
                                                 "held this request; it restarted and serves again"))
                except BaseException:  # noqa: BLE001
                    log.exception("resetting the %s worker failed", self.thread_name)
                time.sleep(0.01)

    def _annotate(self, logprobs: list | None) -> None:
        """Exact token bytes (and EOS flags) on logprobs, computed here in the worker thread."""
        if logprobs and self.token_bytes is not None:
            self.token_bytes.annotate(logprobs)

    def _serve(self) -> None:
        raise NotImplementedError

    def _reset(self, exc: Exception) -> None:
        """End every job the worker held with `exc`, and drop the state it had (called with no lock held)."""
        raise NotImplementedError

    def _cancel_running(self) -> None:
        raise NotImplementedError


class FifoWorker(Worker):
    """FIFO admission + a single worker thread that owns the engine."""

    thread_name = "casspec-engine"

    def __init__(self, engine: Any, method: str, max_queue: int, metrics: Metrics, step_delay: float = 0.0):
        self.engine = engine
        self.method = method
        self.max_queue = max_queue
        self.metrics = metrics
        self.step_delay = step_delay  # testing aid: sleep after each streamed chunk (simulates a slow model)
        self._running: Job | None = None
        super().__init__(engine)

    # -- state ---------------------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self._running is not None

    @property
    def waiting(self) -> int:
        with self._lock:
            return self._outstanding - (1 if self._running is not None else 0)

    def _cancel_running(self) -> None:
        if self._running is not None:
            self._running.cancel.set()

    # -- requests ------------------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue ``job`` (FIFO) or raise QueueFullError when ``max_queue`` requests already wait."""
        self.start()
        with self._lock:
            if self._outstanding >= self.max_queue + 1:
                raise QueueFullError(self._outstanding - 1)
            self._outstanding += 1
            job.state = "queued"
            self._inbox.put(job)

    # -- worker --------------------------------------------------------------------------------------------
    def _serve(self) -> None:
        while not self._stopping:
            job = self._inbox.get(None)
            if job is None:
                continue
            with self._lock:
                if job.state == "dropped":
                    continue
                job.state = "running"
                job.started = time.monotonic()
                self._running = job
            try:
                self._run(job)
            except Exception as exc:  # noqa: BLE001 - this job fails, the worker goes on
                log.exception("worker failure")
                job.put(("error", exc))
            self._retire(job)

    def _retire(self, job: Job) -> bool:
        """Count a job out once; False if it already was."""
        with self._lock:
            if self._running is job:
                self._running = None
            if job.state == "done":
                return False
            job.state = "done"
            self._outstanding -= 1
            return True

    def _reset(self, exc: Exception) -> None:
        job = self._running
        if job is not None and self._retire(job):
            job.put(("error", exc))

    def _run(self, job: Job) -> None:
        if job.cancel.is_set():
            job.put(("error", JobTimeoutError("cancelled before it started")))
            return
        if time.monotonic() >= job.deadline:
            job.put(("error", JobTimeoutError("timed out while waiting in the queue")))
            return
        t0 = time.perf_counter()
        new_tokens = 0
        result = None
        gen = None
        try:
            gen = self.engine.iter_generate(job.req.prompt, self.method, cancel=job.cancel, **job.req.kwargs())
            for chunk in gen:
                new_tokens += len(chunk.token_ids or ())
                self._annotate(chunk.logprobs)
                job.put(("chunk", chunk))
                if chunk.result is not None:
                    result = chunk.result
                    self._annotate(result.logprobs)
                    break
                if self.step_delay:
                    time.sleep(self.step_delay)
                if time.monotonic() >= job.deadline:
                    job.cancel.set()
                if job.cancel.is_set():
                    break
        except Exception as exc:  # noqa: BLE001 - handed to the request (400 for its own errors, else 500)
            if counts_as_failure(exc):
                self.metrics.bump("generation_errors")
            job.put(("error", exc))
            return
        finally:
            if gen is not None and hasattr(gen, "close"):
                gen.close()  # stops a cancelled generation now and frees the engine
        self.metrics.record(result.stats if result is not None else None, new_tokens,
                            time.perf_counter() - t0, job.queue_time)
        if result is not None:
            job.put(("done", result))
        else:
            job.put(("error", JobTimeoutError("cancelled")))
