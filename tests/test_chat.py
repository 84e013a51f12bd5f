"""`casspec chat`: piped-stdin sessions (in-process and as a real subprocess), history, commands, errors."""
from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

import casspec
from casspec.chat import ChatSession, add_parser, run_chat

SRC = str(Path(casspec.__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def engine():
    from casspec.testing import tiny_engine

    return tiny_engine()


def run(session: ChatSession, text: str) -> tuple[int, str]:
    buf = io.StringIO()
    rc = run_chat(session, stdin=io.StringIO(text), console=Console(file=buf, width=200, highlight=False))
    return rc, buf.getvalue()


def test_session_keeps_history_and_resets(engine):
    s = ChatSession(engine, "casspec", max_new_tokens=6, system="Be terse.")
    r1 = s.turn("Hello", lambda t: None)
    streamed: list[str] = []
    r2 = s.turn("And again", streamed.append)
    assert [m["role"] for m in s.history] == ["system", "user", "assistant", "user", "assistant"]
    assert s.history[2]["content"] == r1.text and "".join(streamed) == r2.text
    want = engine.generate([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hello"},
                            {"role": "assistant", "content": r1.text}, {"role": "user", "content": "And again"}],
                           max_new_tokens=6)
    assert r2.text == want.text  # the second turn saw the whole conversation
    s.reset()
    assert s.history == [{"role": "system", "content": "Be terse."}]


def test_repl_commands_stats_and_exit(engine):
    s = ChatSession(engine, "casspec", max_new_tokens=4)
    rc, out = run(s, "hello\n\n/help\n/bogus\nsecond\n/reset\nthird\n/exit\nnever sent\n")
    assert rc == 0
    assert out.count("tok/s") == 3 and out.count("mean accepted length") == 3
    assert "history cleared" in out and "unknown command /bogus" in out and "/reset" in out
    assert [m["content"] for m in s.history if m["role"] == "user"] == ["third"]


def test_repl_error_keeps_going(engine):
    s = ChatSession(engine, "casspec", max_new_tokens=4)
    rc, out = run(s, "x" * 700 + "\nok\n")  # the first message does not fit the 512-token context
    assert rc == 0 and "error:" in out and out.count("tok/s") == 1
    assert [m["content"] for m in s.history if m["role"] == "user"] == ["ok"]


def test_no_chat_template_falls_back_to_transcript():
    from casspec.testing import tiny_engine

    eng = tiny_engine()
    eng.tokenizer.chat_template = None
    s = ChatSession(eng, "casspec", max_new_tokens=4)
    rc, out = run(s, "hello\n")
    assert rc == 0 and "no chat template" in out and out.count("tok/s") == 1
    assert [m["role"] for m in s.history] == ["user", "assistant"]


def test_add_parser_registers_chat():
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["chat", "--max-new-tokens", "7", "--temperature", "0.5", "--method", "ar"])
    assert args.cmd == "chat" and args.max_new_tokens == 7 and args.temperature == 0.5 and callable(args.func)


def test_chat_cli_subprocess_piped_stdin_ctrl_d():
    """`python -m casspec.chat` (what `casspec chat` runs) reading a pipe; EOF (Ctrl-D) ends it cleanly."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "casspec.chat", "--tiny-engine", "llama", "--max-new-tokens", "5"],
                       input="Hi there\n/reset\nOnce more\n", capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("tok/s") == 2 and "history cleared" in p.stdout and "tiny-llama" in p.stdout


def test_chat_main_rejects_bad_options(capsys):
    from casspec.chat import main

    assert main(["--tiny-engine", "llama", "--method", "nope"]) == 2
    assert main(["--tiny-engine", "llama", "--max-new-tokens", "0"]) == 2
    assert "unknown method" in capsys.readouterr().err


def test_sampling_flags_reach_the_generation(engine):
    """--top-k / --min-p / --sampling-rule: a seeded turn samples what `generate` samples with them."""
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["chat", "--temperature", "0.9", "--top-k", "20", "--min-p", "0.05", "--seed", "3",
                              "--sampling-rule", "rejection", "--max-new-tokens", "8"])
    assert (args.top_k, args.min_p, args.sampling_rule) == (20, 0.05, "rejection")
    kw = dict(temperature=0.9, top_p=1.0, top_k=20, min_p=0.05, seed=3)
    s = ChatSession(engine, "ar", 8, kw["temperature"], kw["top_p"], kw["seed"], top_k=20, min_p=0.05,
                    sampling_rule="rejection")
    got = s.turn("Hello", lambda t: None)
    want = engine.generate([{"role": "user", "content": "Hello"}], "ar", max_new_tokens=8, sampling_rule="rejection",
                           **kw)
    assert got.token_ids == want.token_ids


def test_chat_main_rejects_bad_sampling_settings(capsys):
    from casspec.chat import main

    assert main(["--tiny-engine", "llama", "--temperature", "0.7", "--min-p", "1.5"]) == 2
    assert "min_p" in capsys.readouterr().err
