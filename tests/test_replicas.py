"""`casspec serve --replicas 2`: two tiny-engine replicas on Ray Serve behind one loopback port.

Needs the optional extra (pip install 'casspec[serve]'): skipped without Ray, and skipped (not failed)
when Ray itself cannot start here in time. Once Ray is up, a deployment that fails is a failure.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("ray.serve")

import httpx  # noqa: E402
import openai  # noqa: E402

import casspec  # noqa: E402
from helpers import free_port  # noqa: E402

SRC = str(Path(casspec.__file__).resolve().parents[1])
RAY_START_TIMEOUT = 60.0  # seconds for `ray.init` (else skip: Ray cannot run on this machine)
DEPLOY_TIMEOUT = 90.0  # seconds for both replicas to load their engines once Ray is up (else fail)


class ReplicaServer:
    """`python -m casspec.server --tiny-engine llama --replicas 2` as a subprocess; stopped with SIGINT."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.lines: list[str] = []
        env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "casspec.server", "--tiny-engine", "llama", "--replicas", "2", "--threads", "1",
             "--port", str(self.port), "--max-tokens-limit", "64", "--log-level", "warning"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # as a script's background job: stop anyway
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines[-40:])

    def _saw(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def wait_ready(self) -> None:
        t0 = time.monotonic()
        while not self._saw("ray started"):
            if self.proc.poll() is not None or time.monotonic() - t0 > RAY_START_TIMEOUT:
                self.stop()
                pytest.skip(f"Ray did not start within {RAY_START_TIMEOUT:.0f}s here:\n{self.output()}")
            time.sleep(0.2)
        t0 = time.monotonic()
        while not self._saw("serving 2 replicas"):
            assert self.proc.poll() is None, f"server exited ({self.proc.returncode}):\n{self.output()}"
            assert time.monotonic() - t0 < DEPLOY_TIMEOUT, f"replicas did not come up:\n{self.output()}"
            time.sleep(0.2)
        assert httpx.get(self.url + "/health", timeout=10).json()["status"] == "ok"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(90)  # Ray's shutdown takes tens of seconds on a loaded 2-core machine
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def server():
    srv = ReplicaServer()
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()
    assert srv.proc.returncode == 0, f"unclean shutdown ({srv.proc.returncode}):\n{srv.output()}"
    assert srv._saw("shutting down replicas")


@pytest.fixture(scope="module")
def ref():
    from casspec.testing import tiny_engine

    return tiny_engine("llama")


def client(server: ReplicaServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_chat_completion_and_stream_equal_engine(server, ref):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    want = ref.generate(msgs, "casspec", max_new_tokens=12, temperature=0.0).text
    c = client(server)
    r = c.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == want and r.model == "tiny-llama"
    assert r.usage.prompt_tokens == len(ref.encode_prompt(msgs))
    chunks = list(c.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=12, temperature=0,
                                            stream=True))
    assert len(chunks) >= 2 and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_completion_equals_engine(server, ref):
    want = ref.generate("The quick brown fox", "casspec", max_new_tokens=12, temperature=0.0, chat=False).text
    r = client(server).completions.create(model="casspec", prompt="The quick brown fox", max_tokens=12, temperature=0)
    assert r.choices[0].text == want and r.object == "text_completion"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):  # each replica got the CLI's options
        client(server).completions.create(model="tiny-llama", prompt="hi", max_tokens=65)


def test_both_replicas_serve(server, ref):
    """Concurrent requests are spread over the replicas (each names itself in x-casspec-replica)."""
    prompts = [f"request {i}" for i in range(8)]

    def one(prompt: str) -> tuple[str, str]:
        r = httpx.post(server.url + "/v1/completions", timeout=60,
                       json={"prompt": prompt, "max_tokens": 24, "temperature": 0})
        assert r.status_code == 200, r.text
        return r.headers["x-casspec-replica"], r.json()["choices"][0]["text"]

    seen: set[str] = set()
    with ThreadPoolExecutor(8) as pool:
        for _ in range(5):
            results = list(pool.map(one, prompts))
            seen |= {replica for replica, _ in results}
            if len(seen) == 2:
                break
    assert len(seen) == 2, seen
    for prompt, (_, text) in zip(prompts, results):
        assert text == ref.generate(prompt, "casspec", max_new_tokens=24, temperature=0.0, chat=False).text


def _cli(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


def test_without_ray_replicas_exit_2_and_single_server_never_imports_ray():
    p = _cli("import sys; sys.modules['ray'] = None\n"  # as if Ray were not installed
             "from casspec.server import main\n"
             "sys.exit(main(['--tiny-engine', 'llama', '--replicas', '2']))")
    assert p.returncode == 2, p.stderr
    assert "pip install 'casspec[serve]'" in p.stderr
    p = _cli("import sys, casspec.cli\n"
             "args = casspec.cli.build_parser().parse_args(['serve', '--tiny-engine', 'llama'])\n"
             "assert args.replicas == 1 and args.threads is None\n"
             "import casspec.server, casspec.server.app\n"
             "assert 'ray' not in sys.modules, 'the single-process server imported ray'")
    assert p.returncode == 0, p.stderr
