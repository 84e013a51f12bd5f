"""Bad input gets a one-line ValueError subclass (exit 2 in the CLI) and leaves the engine usable."""
from __future__ import annotations

import math

import pytest

from casspec import ContextOverflowError, InvalidRequestError
from casspec.cli import main


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=math.nan), "top_p"),
    (dict(top_k=-3), "top_k"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(stop=[""]), "stop"),
])
def test_bad_sampling_parameters(llama_engine, kwargs, match):
    with pytest.raises(InvalidRequestError, match=match):
        llama_engine.generate("hi there", "ar", **kwargs)


@pytest.mark.parametrize("prompt", ["", "   ", [], [{"role": "user"}], [{"role": "user", "content": ""}]])
def test_empty_or_malformed_prompts(llama_engine, prompt):
    with pytest.raises(InvalidRequestError):
        llama_engine.generate(prompt, "ar")


def test_unknown_method(llama_engine):
    with pytest.raises(InvalidRequestError, match="unknown method"):
        llama_engine.generate("hi", "warp-drive")


def test_context_overflow_then_engine_still_works(llama_engine):
    with pytest.raises(ContextOverflowError, match="context"):
        llama_engine.generate("x" * (llama_engine.context_length + 5), "casspec")
    ref = llama_engine.generate("hi there", "ar", max_new_tokens=5)
    assert llama_engine.generate("hi there", "casspec", max_new_tokens=5).token_ids == ref.token_ids


def test_max_new_tokens_is_clipped_to_the_context(llama_engine):
    prompt = "y" * (llama_engine.context_length - 4)
    out = llama_engine.generate(prompt, "casspec", max_new_tokens=50)
    assert out.stats.new_tokens <= 4


def test_cli_errors_exit_2(capsys):
    assert main(["generate", "hi", "--model", "no-such-model-xyz"]) == 2
    err = capsys.readouterr().err
    assert "error" in err and "no-such-model-xyz" in err and "Traceback" not in err
    assert main(["generate", "   ", "--model", "no-such-model-xyz"]) == 2
