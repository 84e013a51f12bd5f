"""Configuring and starting the server (app.py, cli.py): create_app's checks, the API key, a server without a
chat template, `python -m casspec.server` as a real subprocess, the `serve` parser, and the loadtest command."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

import casspec
from casspec.server import create_app
from helpers import FakeEngine, ThreadServer, assert_error, free_port

SRC = str(Path(casspec.__file__).resolve().parents[1])


def test_api_key_and_no_chat_template():
    eng = FakeEngine(has_chat_template=False)
    app = create_app(eng, api_key="sk-test")
    with ThreadServer(app) as srv:
        assert httpx.get(srv.url + "/health").status_code == 200  # health stays open
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sk-test"}):
            r = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi"}, headers=headers)
            assert_error(r, 401, "invalid_api_key")
            assert r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        assert httpx.get(srv.url + "/metrics").status_code == 401
        with pytest.raises(openai.AuthenticationError):
            srv.client(api_key="wrong").models.list()
        c = srv.client(api_key="sk-test")
        assert c.completions.create(model="fake", prompt="hi", max_tokens=4).choices[0].text == eng.reply("hi", 4)
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            c.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}])


def test_create_app_rejects_bad_config():
    with pytest.raises(ValueError, match="unknown method"):
        create_app(FakeEngine(), method="nope")
    with pytest.raises(ValueError):
        create_app(FakeEngine(), max_queue=-1)


def test_cli_subprocess_server_with_api_key():
    """`python -m casspec.server` (what `casspec serve` runs) serving the tiny model, loopback, with a key."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "casspec.server", "--tiny-engine", "llama", "--port", str(port),
                             "--api-key", "sk-cli", "--max-tokens-limit", "16", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() - t0 < 90, "server did not come up"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert_error(httpx.get(url + "/v1/models"), 401, "invalid_api_key")
        c = openai.OpenAI(base_url=url + "/v1", api_key="sk-cli", max_retries=0, timeout=60)
        r = c.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                      temperature=0)
        assert r.usage.completion_tokens >= 1 and r.choices[0].finish_reason in ("length", "stop")
        with pytest.raises(openai.BadRequestError, match="max_tokens"):
            c.completions.create(model="tiny-llama", prompt="hi", max_tokens=17)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_serve_help_lists_max_batch_and_create_app_rejects_zero():
    exe = Path(sys.executable).with_name("casspec")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "casspec"]
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(cmd + ["serve", "--help"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and "--max-batch" in out.stdout, out.stdout + out.stderr
    from casspec.testing import tiny_engine

    with pytest.raises(ValueError, match="max_batch"):
        create_app(tiny_engine(), max_batch=0)
    with pytest.raises(ValueError, match="max_batch"):
        create_app(FakeEngine(), max_batch=0)
    # max_batch=1, or an engine without a runner: the one-at-a-time worker
    from casspec.server.worker import FifoWorker

    assert isinstance(create_app(FakeEngine(), max_batch=4).state.scheduler, FifoWorker)


def test_add_parser_registers_serve():
    import argparse

    from casspec.server import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["serve", "--port", "9001", "--max-queue", "0", "--api-key", "k"])
    assert (args.cmd, args.host, args.port, args.max_queue, args.api_key, args.method) == \
        ("serve", "127.0.0.1", 9001, 0, "k", "casspec")
    assert callable(args.func) and args.max_tokens_limit == 2048 and args.timeout == 300.0
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--max-queue", "-1"])


def test_loadtest_command_against_fake_server(capsys):
    from casspec.loadtest import main, percentile, run_load

    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0 and percentile([1.0], 95) == 1.0 and percentile([], 50) == 0.0
    eng = FakeEngine(delay=0.002)
    app = create_app(eng, max_queue=8)
    with ThreadServer(app) as srv:
        rep = run_load(srv.url, clients=3, duration=1.0, max_tokens=5, stream=True, request_timeout=10)
        assert rep.ok > 3 and rep.errors == 0 and rep.completion_tokens == 5 * rep.ok
        assert rep.latency_s["p95"] >= rep.latency_s["p50"] > 0 and rep.ttft_s
        assert rep.server["generations"] == rep.ok and rep.server["mean_accepted_length"] == 1.0
        assert main(["--url", srv.url, "--clients", "2", "--duration", "0.5", "--max-tokens", "3",
                     "--endpoint", "completions"]) == 0
        assert "latency: p50" in capsys.readouterr().out
        assert eng.overlaps == 0
    assert main(["--url", "http://127.0.0.1:9", "--clients", "1", "--duration", "0.3", "--warmup", "0",
                 "--request-timeout", "1"]) == 1  # nothing listening: errors, and it still stops
