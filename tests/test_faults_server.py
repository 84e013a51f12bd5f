"""Faults on the serving path: one bad request never takes the others down, every job ends exactly once,
the worker cannot die, memory stays bounded (413 before parsing, dropped jobs leave the queue).

Faults are injected by wrapping objects of one engine (its runner, its n-gram drafter, its batch decoder),
never by patching library globals. A "solo" output is the engine's own `generate` of that prompt alone.
"""
from __future__ import annotations

import asyncio
import gc
import socket
import threading
import time
import weakref

import pytest

from casspec.batching import BatchEngine
from casspec.errors import NonFiniteLogitsError
from casspec.runtime.plans import FULL
from casspec.server import create_app
from casspec.server.batch_worker import BatchWorker
from casspec.server.worker import GenRequest, Job, Metrics, WorkerCrashError
from casspec.testing import tiny_engine

N = 16  # new tokens per request
PROMPTS = [f"Request number {i} says hello" for i in range(4)]


@pytest.fixture(scope="module")
def eng():
    return tiny_engine()


@pytest.fixture(scope="module")
def solo(eng):
    return {p: eng.generate(p, "casspec", max_new_tokens=N, chat=False).token_ids for p in PROMPTS}


def run_batch(eng, prompts, before_step=None):
    """Every prompt through one BatchEngine (max_batch 4): {prompt: (final chunks seen, last result, gen)}."""
    batch = BatchEngine(eng, 4)
    gens = {p: batch.submit(p, "casspec", max_new_tokens=N, chat=False) for p in prompts}
    ends: dict = {p: [] for p in prompts}
    steps = 0
    while batch.busy:
        if before_step is not None:
            before_step(batch, gens, steps)
        for g, chunk in batch.step():
            if chunk.result is not None:
                ends[next(p for p, x in gens.items() if x is g)].append(chunk.result)
        steps += 1
    return batch, gens, ends


# -- BatchEngine: per-request isolation ------------------------------------------------------------------------
def test_raising_drafter_fails_only_its_request(eng, solo, monkeypatch):
    """The n-gram drafter raises for one request: it alone ends with that error, the 3 others get their solo
    output; every generation ends exactly once; the pool is empty afterwards."""
    bad_state = {}
    lookup = eng.pool.ngram.continuation  # a casspec request's lookup of its committed tokens

    def raising_lookup(state, k):
        if state is bad_state.get("s"):
            raise RuntimeError("drafter exploded")
        return lookup(state, k)

    monkeypatch.setattr(eng.pool.ngram, "continuation", raising_lookup)

    def poison(batch, gens, steps):
        if steps == 1:  # after the prompts are in (step 0)
            bad_state["s"] = gens[PROMPTS[1]].state

    batch, gens, ends = run_batch(eng, PROMPTS, poison)
    assert all(len(e) == 1 for e in ends.values()), ends
    bad = gens[PROMPTS[1]]
    assert ends[PROMPTS[1]][0].stats.finish_reason == "error" and "exploded" in str(bad.error)
    for p in (PROMPTS[0], PROMPTS[2], PROMPTS[3]):
        assert ends[p][0].token_ids == solo[p] and getattr(gens[p], "error", None) is None
    assert batch.kv.used == 0 and not batch.running and not batch.waiting


def test_nan_row_fails_only_its_request(eng, solo, monkeypatch):
    """One request's rows of the target's logits turn NaN: a clear NonFiniteLogitsError for it alone, after
    the others' tokens of that step were rolled back and redone (their output is unchanged)."""
    forward_batch = eng.runner.forward_batch
    bad_cache = {}

    def nan_forward(segments, plan=FULL, logits_rows=None, prefill=False, argmax_only=False):
        out = forward_batch(segments, plan, logits_rows, prefill, argmax_only).clone()  # an inference tensor: copy
        if plan is FULL and out.shape[0]:
            start = 0
            for seg in segments:
                if seg.cache is bad_cache.get("c") and start < out.shape[0]:
                    out[start:start + len(seg)] = float("nan")
                start += len(seg)
        return out

    monkeypatch.setattr(eng.runner, "forward_batch", nan_forward)

    def poison(batch, gens, steps):
        if steps == 1:
            bad_cache["c"] = gens[PROMPTS[3]].state.cache  # the last of the batch: the others commit first

    batch, gens, ends = run_batch(eng, PROMPTS, poison)
    assert isinstance(gens[PROMPTS[3]].error, NonFiniteLogitsError)
    assert ends[PROMPTS[3]][0].stats.finish_reason == "error"
    for p in PROMPTS[:3]:
        assert len(ends[p]) == 1 and ends[p][0].token_ids == solo[p]
    assert batch.kv.used == 0


def test_step_raising_after_cancellations(eng, solo, monkeypatch):
    """A request is cancelled, then the batched step raises (once, for everyone): the cancelled one still
    gets its closing chunk, the 3 others are retried alone and finish with their solo output."""
    def poison(batch, gens, steps):
        if steps == 2:
            gens[PROMPTS[0]].cancel.set()
            step = batch.decoder.step

            def fail_once(running):
                monkeypatch.setattr(batch.decoder, "step", step)
                raise MemoryError("out of memory in the batched forward")
            monkeypatch.setattr(batch.decoder, "step", fail_once)

    batch, gens, ends = run_batch(eng, PROMPTS, poison)
    assert [r.stats.finish_reason for r in ends[PROMPTS[0]]] == ["cancelled"]
    for p in PROMPTS[1:]:
        assert len(ends[p]) == 1 and ends[p][0].token_ids == solo[p]
    assert batch.kv.used == 0


# -- the batched server worker: counters, exactly-once endings, the supervisor ---------------------------------
def drive(sched: BatchWorker, reqs: list[GenRequest], act=None, timeout: float = 60.0) -> list[list[tuple]]:
    """Submit jobs to a started scheduler and collect every item each receives (until its final one)."""
    async def main():
        loop = asyncio.get_running_loop()
        jobs = [Job(r, loop, timeout) for r in reqs]
        for job in jobs:
            sched.submit(job)
        if act is not None:
            act(jobs)
        items: list[list[tuple]] = [[] for _ in jobs]

        async def collect(i, job):
            while True:
                item = await job.next(timeout)
                assert item is not None, "a job never ended"
                items[i].append(item)
                if item[0] != "chunk":
                    await asyncio.sleep(0.2)  # a second ending would arrive now
                    while not job.queue.empty():
                        items[i].append(job.queue.get_nowait())
                    return
        await asyncio.gather(*(collect(i, j) for i, j in enumerate(jobs)))
        return items
    return asyncio.run(main())


def text_of(items) -> list[int]:
    return [t for kind, c in items if kind == "chunk" for t in c.token_ids]


def test_worker_isolates_a_failing_request_and_counts_return_to_zero(eng, solo, monkeypatch):
    sched = BatchWorker(eng, "casspec", max_queue=4, metrics=Metrics(), max_batch=4)
    lookup = eng.pool.ngram.continuation  # every casspec step looks up its committed tokens first

    def raising_lookup(state, k):
        if state.tokens[:len(bad_ids)] == bad_ids:
            raise IndexError("index out of range in self")
        return lookup(state, k)

    bad_ids = eng.encode_prompt(PROMPTS[2], chat=False)
    monkeypatch.setattr(eng.pool.ngram, "continuation", raising_lookup)
    reqs = [GenRequest(prompt=p, max_new_tokens=N, temperature=0.0) for p in PROMPTS]
    try:
        items = drive(sched, reqs)
    finally:
        sched.stop()
    finals = [[it for it in its if it[0] != "chunk"] for its in items]
    assert all(len(f) == 1 for f in finals), finals
    assert finals[2][0][0] == "error" and isinstance(finals[2][0][1], IndexError)
    for i in (0, 1, 3):
        assert finals[i][0][0] == "done" and text_of(items[i]) == solo[PROMPTS[i]]
    assert sched._outstanding == 0 and not sched._running and sched.batch.kv.used == 0
    assert sched.metrics.generation_errors == 1 and sched.metrics.worker_restarts == 0


def test_worker_crash_is_supervised(eng, monkeypatch):
    """Something escapes the step loop itself: the supervisor logs and counts it, ends the held jobs with an
    error (once each), resets the batch, and the same thread serves the next request."""
    metrics = Metrics()
    sched = BatchWorker(eng, "casspec", max_queue=4, metrics=metrics, max_batch=4)
    deliver = sched._deliver
    state = {"n": 0}

    def crashing_deliver(gen, chunk):
        state["n"] += 1
        if state["n"] == 3:
            raise SystemError("bug in the worker loop")
        deliver(gen, chunk)

    monkeypatch.setattr(sched, "_deliver", crashing_deliver)
    try:
        items = drive(sched, [GenRequest(prompt=p, max_new_tokens=N, temperature=0.0) for p in PROMPTS[:2]])
        thread = sched._thread
        finals = [[it for it in its if it[0] != "chunk"] for its in items]
        assert all(len(f) == 1 and f[0][0] == "error" and isinstance(f[0][1], WorkerCrashError) for f in finals)
        assert metrics.worker_restarts == 1 and sched.alive
        assert sched._outstanding == 0 and not sched._running and sched.batch.kv.used == 0
        again = drive(sched, [GenRequest(prompt=PROMPTS[3], max_new_tokens=4, temperature=0.0)])
        assert again[0][-1][0] == "done" and sched._thread is thread
    finally:
        sched.stop()


def test_dropped_jobs_release_their_prompts_at_once(eng):
    """200 submit-and-drop cycles while the batch is full: none stays queued, no prompt stays alive."""
    sched = BatchWorker(eng, "casspec", max_queue=4, metrics=Metrics(), max_batch=2, step_delay=0.02)
    refs = []

    async def main():
        loop = asyncio.get_running_loop()
        long = [Job(GenRequest(prompt=f"long {i}", max_new_tokens=400, temperature=0.0), loop, 60) for i in range(2)]
        for job in long:
            sched.submit(job)
        while sched.running < 2:
            await asyncio.sleep(0.01)
        for i in range(200):
            req = GenRequest(prompt="x" * 100_000 + str(i), max_new_tokens=8, temperature=0.0)
            job = Job(req, loop, 60)
            sched.submit(job)
            assert sched.abandon(job)
            refs.append(weakref.ref(req))
            del job, req
        assert sched._outstanding == 2 and len(sched._inbox) == 0
        for job in long:
            sched.abandon(job)
    try:
        asyncio.run(main())
    finally:
        sched.stop()
    gc.collect()
    assert not [r for r in refs if r() is not None]


# -- bounded request bodies ---------------------------------------------------------------------------------------
def _rss() -> int:
    psutil = pytest.importorskip("psutil")
    return psutil.Process().memory_info().rss


def _raw_post(port: int, headers: str, body_chunks) -> bytes:
    """POST over a raw socket, sending body chunks until the server answers; returns the response head."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(headers.encode())
        s.setblocking(False)
        got = b""
        for chunk in body_chunks:
            try:
                got += s.recv(65536)
            except BlockingIOError:
                pass
            if got:
                break
            try:
                s.sendall(chunk)
            except BlockingIOError:
                time.sleep(0.001)
            except OSError:
                break
        s.setblocking(True)
        s.settimeout(30)
        while b"\r\n\r\n" not in got:
            more = s.recv(65536)
            if not more:
                break
            got += more
        return got


def test_50mb_body_gets_413_before_parsing_without_memory_growth(eng):
    from helpers import ThreadServer

    app = create_app(eng, max_body_bytes=1 << 20)
    with ThreadServer(app) as srv:
        before = _rss()
        size = 50 * 1024 * 1024
        piece = b'{"prompt": "' + b"a" * 65536
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {size}\r\n\r\n")
        t0 = time.monotonic()
        r = _raw_post(srv.port, head, (piece for _ in range(size // len(piece))))
        assert r.startswith(b"HTTP/1.1 413"), r[:200]
        chunked = ("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   "Transfer-Encoding: chunked\r\n\r\n")
        frame = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        r = _raw_post(srv.port, chunked, (frame for _ in range(size // len(piece))))
        assert r.startswith(b"HTTP/1.1 413"), r[:200]
        grown = (_rss() - before) / 2**20
        print(f"413 x2 in {time.monotonic() - t0:.2f} s, RSS grew {grown:.1f} MiB")
        assert grown < 8, grown
        ok = __import__("httpx").post(srv.url + "/v1/completions", timeout=60,
                                      json={"prompt": "still fine", "max_tokens": 2})
        assert ok.status_code == 200
        m = __import__("httpx").get(srv.url + "/metrics").json()
        assert m["requests"]["by_status"].get("413") == 2


def test_start_replaces_a_dead_worker_thread(eng):
    """Were the worker thread ever gone, the next submit starts a new one from a clean state and counts it."""
    metrics = Metrics()
    sched = BatchWorker(eng, "casspec", max_queue=1, metrics=metrics, max_batch=2)
    dead = threading.Thread(target=lambda: None)
    dead.start()
    dead.join()
    sched._thread = dead
    try:
        items = drive(sched, [GenRequest(prompt=PROMPTS[0], max_new_tokens=4, temperature=0.0)])
        assert items[0][-1][0] == "done" and metrics.worker_restarts == 1 and sched._thread is not dead
    finally:
        sched.stop()
