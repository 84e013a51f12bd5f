"""The workers behind the server (worker.py, batch_worker.py): queueing and 429s, FIFO order, timeouts,
client disconnects cancelling generation, and the batched worker's admission, slots and outputs.

Servers run uvicorn in a thread of this process, on the tiny random model or a controllable FakeEngine."""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from casspec.server import create_app
from helpers import FakeEngine, ThreadServer, assert_error, sse_events, wait_until


def test_disconnect_cancels_real_engine():
    """A client that goes away mid-stream stops its generation; the next request is served at once."""
    from casspec.testing import tiny_engine

    app = create_app(tiny_engine(), max_tokens_limit=512, request_timeout=60, step_delay=0.1)
    with ThreadServer(app) as srv:
        with httpx.stream("POST", srv.url + "/v1/completions", timeout=60,
                          json={"prompt": "A long story", "max_tokens": 400, "temperature": 0, "stream": True}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                    break  # got the first text; hang up
        t0 = time.monotonic()
        r2 = httpx.post(srv.url + "/v1/completions", timeout=60,
                        json={"prompt": "Next", "max_tokens": 2, "temperature": 0})
        assert r2.status_code == 200
        assert time.monotonic() - t0 < 8.0  # the abandoned one needed >= 20 s (400 tokens, 0.1 s/step)
        wait_until(lambda: app.state.metrics.cancelled == 1, 5, "cancel count")


def test_queue_full_gives_429_and_fifo():
    eng = FakeEngine(delay=0.02)
    app = create_app(eng, method="casspec", max_queue=1, request_timeout=60)
    with ThreadServer(app) as srv:
        sched = app.state.scheduler
        with httpx.stream("POST", srv.url + "/v1/completions", timeout=60,
                          json={"prompt": "A", "max_tokens": 2000, "stream": True}) as a:
            lines = a.iter_lines()  # keep the iterator: dropping it would close the connection
            next(lines)  # A is running
            done = {}
            t = threading.Thread(target=lambda: done.setdefault("b", httpx.post(
                srv.url + "/v1/completions", json={"prompt": "B", "max_tokens": 3}, timeout=60)))
            t.start()
            wait_until(lambda: sched.waiting == 1, what="B queued")
            r = httpx.post(srv.url + "/v1/completions", json={"prompt": "C", "max_tokens": 3})
            assert_error(r, 429, "queue_full")
            assert r.headers["retry-after"] == "1"
            with pytest.raises(openai.RateLimitError):
                srv.client().chat.completions.create(model="fake", messages=[{"role": "user", "content": "D"}])
        t.join(10)  # A hung up -> B runs
        assert done["b"].status_code == 200 and done["b"].json()["choices"][0]["text"] == eng.reply("B", 3)
        assert eng.overlaps == 0 and eng.started == ["A", "B"] and eng.ended == ["closed", "done"]

    # FIFO: requests are served in arrival order
    eng = FakeEngine(delay=0.01)
    app = create_app(eng, max_queue=8)
    with ThreadServer(app) as srv:
        results, threads = {}, []
        for i in range(6):
            p = f"p{i}"
            threads.append(threading.Thread(target=lambda p=p: results.setdefault(p, httpx.post(
                srv.url + "/v1/completions", json={"prompt": p, "max_tokens": 20 if p == "p0" else 3}, timeout=60))))
            threads[-1].start()
            wait_until(lambda i=i: len(eng.started) + app.state.scheduler.waiting == i + 1, what=f"p{i} admitted")
        for t in threads:
            t.join(20)
        assert eng.started == [f"p{i}" for i in range(6)] and eng.overlaps == 0
        assert all(r.status_code == 200 for r in results.values())


def test_timeout_cancels_and_reports():
    eng = FakeEngine(delay=0.05)
    app = create_app(eng, request_timeout=1.0)
    with ThreadServer(app) as srv:
        t0 = time.monotonic()
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "slow", "max_tokens": 1000}, timeout=30)
        assert_error(r, 504, "timeout")
        assert r.json()["error"]["type"] == "timeout_error" and time.monotonic() - t0 < 5
        with pytest.raises(openai.APIError, match="timed out"):
            for _ in srv.client().completions.create(model="fake", prompt="slow2", max_tokens=1000, stream=True):
                pass
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "quick", "max_tokens": 3}, timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == eng.reply("quick", 3)
        assert eng.overlaps == 0 and eng.ended == ["closed", "closed", "done"]
        assert app.state.metrics.timeouts == 2


def test_nonstream_disconnect_cancels():
    eng = FakeEngine(delay=0.02)
    app = create_app(eng, request_timeout=60)
    with ThreadServer(app) as srv:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/v1/chat/completions", timeout=0.5,
                       json={"messages": [{"role": "user", "content": "long"}], "max_tokens": 2000})
        wait_until(lambda: eng.ended == ["closed"], 5, "generation cancelled")
        assert len(eng.started) == 1 and app.state.metrics.cancelled == 1


def test_batch_worker_queue_full_outputs_and_metrics(ref):
    """max_batch=4, max_queue=1: of 8 simultaneous streams, 5 are served (exactly the engine's greedy output), 3 get 429."""
    from casspec.server.batch_worker import BatchWorker
    from casspec.testing import tiny_engine

    app = create_app(tiny_engine(), max_batch=4, max_queue=1, step_delay=0.05, max_tokens_limit=64,
                     request_timeout=60)
    sched = app.state.scheduler
    assert isinstance(sched, BatchWorker) and sched.max_batch == 4
    prompts = [f"Batch client {i} asks" for i in range(8)]
    want = {p: ref.generate(p, "casspec", max_new_tokens=24, temperature=0.0, chat=False).text for p in prompts}
    with ThreadServer(app) as srv:
        gate = threading.Barrier(8)

        def one(p: str):
            gate.wait()
            with httpx.stream("POST", srv.url + "/v1/completions", timeout=60,
                              json={"prompt": p, "max_tokens": 24, "temperature": 0, "stream": True}) as r:
                if r.status_code != 200:
                    r.read()
                    return r.status_code, r
                events = sse_events(r.iter_lines())
            assert events[-1] == "[DONE]" and all("error" not in e for e in events[:-1]), events
            return 200, "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"])

        with ThreadPoolExecutor(8) as pool:
            got = dict(zip(prompts, pool.map(one, prompts)))
        served = {p: text for p, (status, text) in got.items() if status == 200}
        refused = [r for status, r in got.values() if status != 200]
        assert len(served) == 5 and len(refused) == 3, {p: s for p, (s, _) in got.items()}
        for r in refused:
            assert_error(r, 429, "queue_full")
        assert served == {p: want[p] for p in served}
        m = httpx.get(srv.url + "/metrics").json()
        assert m["queue"]["max_batch"] == 4 and m["queue"]["max_queue"] == 1
        assert m["requests"]["rejected_queue_full"] == 3 and m["generation"]["count"] == 5
        wait_until(lambda: sched.batch.kv.used == 0 and sched.waiting == 0 and not sched.busy, 5, "batch drained")


def test_batch_worker_disconnect_frees_slots_others_go_on(ref):
    """A client gone mid-stream leaves the batch (its KV region freed); the request beside it is unaffected."""
    from casspec.testing import tiny_engine

    app = create_app(tiny_engine(), max_batch=4, max_queue=1, step_delay=0.05, max_tokens_limit=512,
                     request_timeout=60)
    sched = app.state.scheduler
    want_b = ref.generate("Neighbour request", "casspec", max_new_tokens=30, temperature=0.0, chat=False).text
    want_c = ref.generate("After the hang-up", "casspec", max_new_tokens=8, temperature=0.0, chat=False).text
    with ThreadServer(app) as srv:
        done = {}
        with httpx.stream("POST", srv.url + "/v1/completions", timeout=60,
                          json={"prompt": "A long story", "max_tokens": 400, "temperature": 0, "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            b = threading.Thread(target=lambda: done.setdefault("b", httpx.post(
                srv.url + "/v1/completions", json={"prompt": "Neighbour request", "max_tokens": 30, "temperature": 0},
                timeout=60)))
            b.start()
            wait_until(lambda: sched.running == 2, 10, "both in the batch")
            assert sched.batch.kv.used > 0
            for line in lines:
                if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                    break  # got text while B runs beside it; hang up
        wait_until(lambda: app.state.metrics.cancelled == 1, 10, "cancel count")
        b.join(30)
        assert done["b"].status_code == 200 and done["b"].json()["choices"][0]["text"] == want_b
        wait_until(lambda: sched.batch.kv.used == 0 and not sched.busy and sched.waiting == 0, 10, "slots freed")
        assert not sched.batch.running and not sched.batch.waiting
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "After the hang-up", "max_tokens": 8,
                                                         "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want_c
        assert sched.batch.kv.used == 0 and sched._outstanding == 0


def _jobs(n: int, loop, **kw):
    from casspec.server.worker import GenRequest, Job

    return [Job(GenRequest(prompt=f"job {i}", max_new_tokens=kw.get("max_new_tokens", 4), temperature=0.0), loop, 60)
            for i in range(n)]


def test_batch_scheduler_admission_counts_running_plus_queue(ref, monkeypatch):
    """submit refuses exactly beyond max_batch running + max_queue waiting, however far the worker lags behind."""
    import asyncio

    from casspec.server.batch_worker import BatchWorker
    from casspec.server.worker import Metrics, QueueFullError

    sched = BatchWorker(ref, "casspec", max_queue=1, metrics=Metrics(), max_batch=4)
    monkeypatch.setattr(sched, "start", lambda: None)  # the worker has not picked anything up yet
    loop = asyncio.new_event_loop()
    try:
        jobs = _jobs(6, loop)
        for job in jobs[:5]:
            sched.submit(job)
        with pytest.raises(QueueFullError):
            sched.submit(jobs[5])
        assert sched.abandon(jobs[0]) and jobs[0].state == "dropped"
        sched.submit(jobs[5])  # a dropped request gives its place back
    finally:
        loop.close()


def test_batch_scheduler_abandon_while_starting_counts_once(ref, monkeypatch):
    """A request abandoned while the worker is submitting it to the batch is counted out exactly once."""
    import asyncio

    from casspec.server.batch_worker import BatchWorker
    from casspec.server.worker import Metrics

    sched = BatchWorker(ref, "casspec", max_queue=2, metrics=Metrics(), max_batch=2)
    submit = sched.batch.submit

    def racing_submit(*a, tag=None, **kw):
        sched.abandon(tag)  # the client goes away right now
        return submit(*a, tag=tag, **kw)

    monkeypatch.setattr(sched.batch, "submit", racing_submit)
    loop = asyncio.new_event_loop()
    try:
        job, = _jobs(1, loop)
        sched.submit(job)
        wait_until(lambda: job.state == "done" and not sched.batch.busy, 10, "job retired")
        assert sched._outstanding == 0 and sched.waiting == 0 and sched.batch.kv.used == 0
    finally:
        sched.stop()
        loop.close()
