"""One engine, one worker thread: generations run one at a time, FIFO, outside the event loop.

The event loop never touches the engine (not even its tokenizer). A request becomes a :class:`Job`;
the worker thread runs ``engine.iter_generate`` for it and hands items back to the request's asyncio
queue with ``loop.call_soon_threadsafe``. Items are ``("chunk", StreamChunk)``, ``("done", result)`` and
``("error", exception)``; exactly one ``done``/``error`` ends a job that ran. Setting ``job.cancel``
(client gone, timeout) stops the generation after the current step and frees the engine.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("casspec.server")


class QueueFullError(Exception):
    """More than ``max_queue`` requests are already waiting."""


class JobTimeoutError(Exception):
    """The request ran past its deadline (raised in the worker for a job that timed out while queued)."""


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
        kw = dict(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
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


@dataclass
class _DrafterTotals:
    proposed: int = 0
    accepted: int = 0
    forwards: int = 0
    time: float = 0.0


@dataclass
class Metrics:
    """Server-wide counters (thread-safe)."""

    started: float = field(default_factory=time.time)
    requests: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    rejected_queue_full: int = 0
    timeouts: int = 0
    cancelled: int = 0
    generations: int = 0
    generation_errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    generation_time: float = 0.0
    queue_time: float = 0.0
    verify_steps: int = 0
    committed_in_steps: int = 0
    drafters: dict[str, _DrafterTotals] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count_response(self, status: int) -> None:
        with self.lock:
            self.requests += 1
            self.by_status[str(status)] = self.by_status.get(str(status), 0) + 1

    def bump(self, name: str, n: int = 1) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + n)

    def record(self, stats: Any | None, new_tokens: int, wall: float, queue_time: float) -> None:
        """Add one finished (or cancelled: stats None) generation."""
        with self.lock:
            self.generations += 1
            self.queue_time += queue_time
            if stats is None:
                self.completion_tokens += new_tokens
                self.generation_time += wall
                return
            self.prompt_tokens += int(stats.prompt_tokens)
            self.completion_tokens += int(stats.new_tokens)
            self.generation_time += float(stats.wall_time) or wall
            self.verify_steps += len(stats.accept_lengths)
            self.committed_in_steps += sum(stats.accept_lengths)
            for name, d in (stats.drafters or {}).items():
                t = self.drafters.setdefault(name, _DrafterTotals())
                t.proposed += d.proposed
                t.accepted += d.accepted
                t.forwards += d.forwards
                t.time += d.time

    def snapshot(self) -> dict:
        with self.lock:
            gen_t = self.generation_time
            return {
                "uptime_s": round(time.time() - self.started, 3),
                "requests": {
                    "total": self.requests,
                    "by_status": dict(sorted(self.by_status.items())),
                    "rejected_queue_full": self.rejected_queue_full,
                    "timeouts": self.timeouts,
                    "cancelled": self.cancelled,
                },
                "tokens": {
                    "prompt": self.prompt_tokens,
                    "completion": self.completion_tokens,
                    "total": self.prompt_tokens + self.completion_tokens,
                },
                "generation": {
                    "count": self.generations,
                    "errors": self.generation_errors,
                    "time_s": round(gen_t, 6),
                    "tokens_per_s": self.completion_tokens / gen_t if gen_t > 0 else 0.0,
                    "mean_queue_time_s": self.queue_time / self.generations if self.generations else 0.0,
                    "verify_steps": self.verify_steps,
                    "mean_accepted_length": self.committed_in_steps / self.verify_steps if self.verify_steps else 0.0,
                },
                "drafters": {
                    name: {
                        "proposed": t.proposed,
                        "accepted": t.accepted,
                        "acceptance": t.accepted / t.proposed if t.proposed else 0.0,
                        "forwards": t.forwards,
                        "time_s": round(t.time, 6),
                    }
                    for name, t in sorted(self.drafters.items())
                },
            }


class _Worker:
    """What both workers share: the admission counter, the one worker thread, and abandoning a job."""

    thread_name = "casspec-worker"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._outstanding = 0  # queued + running
        self._thread: threading.Thread | None = None
        self._stopping = False

    @property
    def alive(self) -> bool:
        return self._thread is None or self._thread.is_alive()

    def start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stopping = False
                self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
                self._thread.start()

    def abandon(self, job: Job) -> bool:
        """Stop ``job`` (cancel it, or drop it from the queue). Returns True if it had not finished."""
        job.cancel.set()
        job.drop_getter()
        with self._lock:
            if job.state == "queued":
                job.state = "dropped"
                self._outstanding -= 1
                return True
            return job.state == "running" and not job.finished

    def _loop(self) -> None:
        raise NotImplementedError


class Scheduler(_Worker):
    """FIFO admission + a single worker thread that owns the engine."""

    thread_name = "casspec-engine"

    def __init__(self, engine: Any, method: str, max_queue: int, metrics: Metrics, step_delay: float = 0.0):
        self.engine = engine
        self.method = method
        self.max_queue = max_queue
        self.metrics = metrics
        self.step_delay = step_delay  # testing aid: sleep after each streamed chunk (simulates a slow model)
        self._q: queue.Queue[Job | None] = queue.Queue()
        self._running: Job | None = None
        super().__init__()

    # -- state ---------------------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self._running is not None

    @property
    def waiting(self) -> int:
        with self._lock:
            return self._outstanding - (1 if self._running is not None else 0)

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._stopping = True
            running, thread = self._running, self._thread
        if running is not None:
            running.cancel.set()
        self._q.put(None)
        if thread is not None:
            thread.join(timeout)

    # -- requests ------------------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue ``job`` (FIFO) or raise QueueFullError when ``max_queue`` requests already wait."""
        self.start()
        with self._lock:
            if self._outstanding >= self.max_queue + 1:
                raise QueueFullError(self._outstanding - 1)
            self._outstanding += 1
            job.state = "queued"
            self._q.put(job)

    # -- worker --------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                if self._stopping:
                    return
                continue
            with self._lock:
                if job.state == "dropped":
                    continue
                job.state = "running"
                job.started = time.monotonic()
                self._running = job
            try:
                self._run(job)
            except BaseException as exc:  # never let the worker die
                log.exception("worker failure")
                job.put(("error", exc))
            finally:
                with self._lock:
                    job.state = "done"
                    self._running = None
                    self._outstanding -= 1

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
                job.put(("chunk", chunk))
                if chunk.result is not None:
                    result = chunk.result
                    break
                if self.step_delay:
                    time.sleep(self.step_delay)
                if time.monotonic() >= job.deadline:
                    job.cancel.set()
                if job.cancel.is_set():
                    break
        except Exception as exc:
            if not isinstance(exc, ValueError):  # ValueError = casspec's bad-request errors (a 400)
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
