"""The llama.cpp peers of `casspec bench`: departure accounting, skipping, and a real run.

a) pure functions: the first departure from "ar", and its accounting (not a lossless failure);
b) the skip path on the tiny engine: no GGUF file, or llama_cpp not importable -> one message,
   and the race goes on with the other methods;
c) llama-cpp-python on the real default model's GGUF (skipped when llama_cpp is not installed).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from casspec.bench import cli as bench_cli
from casspec.bench.compare import compare_to_reference, first_departure
from casspec.bench.llamacpp import (
    INSTALL_HINT,
    LLAMACPP_PEERS,
    LlamaCppPeers,
    context_size,
    sampling_kwargs,
    unavailable_reason,
)
from casspec.bench.prompts import Question
from casspec.bench.report import departure_section, summarize
from casspec.bench.runner import BenchConfig, run_model

EOS = 2
QUESTION = {"question_id": 241, "category": "summarization", "turns": ["Summarize: a cat sat. a cat sat."]}


class GGUFEngine:
    """An engine seen with a given `gguf_path` (None: the model did not come from a GGUF file)."""

    def __init__(self, engine: Any, gguf_path: Path | None) -> None:
        self._engine = engine
        self.gguf_path = gguf_path

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


# a) pure functions ---------------------------------------------------------------------------

def test_first_departure_on_lists() -> None:
    assert first_departure([5, 6, 7, EOS], [5, 6, 7, EOS], [EOS]) is None
    assert first_departure([5, 6, 7, EOS], [5, 6, 7], [EOS]) is None  # a trailing EOS is not a token
    assert first_departure([5, 6, 7], [5, 6, 9, 7], [EOS]) == 2
    assert first_departure([5, 6, 7], [4], [EOS]) == 0
    assert first_departure([5, 6, 7], [5, 6], [EOS]) == 2  # stopped early: departs where it stopped
    assert first_departure([5, 6], [5, 6, 7, 8], None) == 2


def test_context_and_sampler_settings() -> None:
    assert [context_size(n, 8192) for n in (1, 256, 257, 9000)] == [256, 256, 512, 8192]
    greedy = sampling_kwargs(0.0, 0.9, 50)
    assert (greedy["temp"], greedy["top_k"], greedy["min_p"], greedy["repeat_penalty"]) == (0.0, 1, 0.0, 1.0)
    sampled = sampling_kwargs(0.7, 0.9, 0)
    assert (sampled["temp"], sampled["top_p"], sampled["top_k"], sampled["min_p"]) == (0.7, 0.9, 0, 0.0)


def _rec(method: str, ids: list[int]) -> dict[str, Any]:
    return {"model": "m", "method": method, "question_id": 1, "category": "qa", "turn": 1, "repeat": 0,
            "new_tokens": len(ids), "wall_time": 1.0, "accept_lengths": None, "error": None,
            "token_ids": ids, "_prompt_ids": [1, 9, 9]}


def test_departure_is_reported_not_counted_as_a_lossless_failure() -> None:
    block = [_rec("ar", [5, 6, 7, EOS]), _rec("pld", [5, 6, 8]), _rec("llama.cpp", [5, 6, 9, 7]),
             _rec("llama.cpp-pld", [5, 6, 7])]
    skeleton = torch.nn.Linear(2, 2, device="meta")  # a model without weights: no gap, and no crash
    compare_to_reference(block, skeleton, eos=[EOS], greedy=True, approximate=LLAMACPP_PEERS)
    by = {r["method"]: r for r in block}
    assert (by["pld"]["lossless"], by["pld"]["mismatch"]["position"]) == (False, 2)
    assert (by["llama.cpp"]["lossless"], by["llama.cpp"]["identical_to_ar"]) == (None, False)
    assert by["llama.cpp"]["first_departure"] == 2 and by["llama.cpp"]["mismatch"]["position"] == 2
    assert by["llama.cpp"]["mismatch"]["gap"] is None
    assert by["llama.cpp-pld"]["identical_to_ar"] is True and by["llama.cpp-pld"]["first_departure"] is None
    models = summarize(block)
    assert [m["method"] for m in models["m"]["mismatches"]] == ["pld"]  # llama.cpp is not a failure
    cell = models["m"]["table"]["llama.cpp"]["overall"]
    assert (cell["compared"], cell["departure_compared"], cell["identical"]) == (0, 1, 0)
    assert cell["first_departure_median"] == 2
    section = departure_section(models)
    assert "| llama.cpp | 2 (0/1 identical) |" in section
    assert "| llama.cpp-pld | – (1/1 identical) |" in section
    block.pop(1)  # without the broken "pld", --strict has nothing to flag
    compare_to_reference(block, None, eos=[EOS], greedy=True, approximate=LLAMACPP_PEERS)
    assert not bench_cli._failed({"models": summarize(block)})


# b) skipped with one message, the race goes on --------------------------------------------

def test_no_gguf_skips_the_peers_with_one_message(llama_engine: Any, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "question.jsonl"
    prompts.write_text(json.dumps(QUESTION) + "\n", encoding="utf-8")
    parser = argparse.ArgumentParser()
    bench_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--models", "tiny", "--methods", "ar,pld,llama.cpp,llama.cpp-pld",
                              "--limit", "1", "--max-new-tokens", "4", "--prompts", str(prompts),
                              "--out", str(tmp_path / "out"), "--no-progress"])
    engines = {"tiny": GGUFEngine(llama_engine, None)}
    assert bench_cli.bench_command(args, engines=engines) == 0
    err = capsys.readouterr().err
    assert err.count("skipped") == 1
    assert "llama.cpp, llama.cpp-pld peers skipped: model has no GGUF file" in err
    rows = [json.loads(x) for x in (tmp_path / "out/results.jsonl").read_text().splitlines()]
    assert sorted(r["method"] for r in rows) == ["ar", "pld"]
    assert all(r["error"] is None and r["new_tokens"] == 4 for r in rows)


def test_missing_llama_cpp_skips_the_peer(llama_engine: Any, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` now raises ImportError
    engine = GGUFEngine(llama_engine, gguf)
    assert unavailable_reason(engine) == INSTALL_HINT
    assert "not found" in unavailable_reason(GGUFEngine(llama_engine, tmp_path / "nope.gguf"))
    said: list[str] = []
    cfg = BenchConfig(methods=["llama.cpp"], max_new_tokens=3, warmup_tokens=2)
    recs = run_model(engine, [Question(241, "summarization", "summarization", QUESTION["turns"])], cfg,
                     progress=False, log=said.append)
    assert said == ["[bench] llama.cpp peer skipped: " + INSTALL_HINT]
    assert "pip install 'casspec[llamacpp]'" in said[0]
    assert [(r["method"], r["error"]) for r in recs] == [("ar", None)]


# c) the real thing ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    pytest.importorskip("llama_cpp")
    from casspec.runtime import loading

    try:
        return loading._smollm2_gguf()
    except Exception as e:  # noqa: BLE001 - the PyPI package holding the file is missing
        pytest.skip(f"SmolLM2 GGUF not available: {e}")


class _StubEngine:
    """Just what LlamaCppPeers reads from an engine, for the real GGUF without loading the HF model."""

    def __init__(self, gguf: Path, eos: int) -> None:
        self.gguf_path, self.context_length, self.eos_ids = gguf, 8192, frozenset({eos})
        self.tokenizer = self

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


def test_llama_cpp_peer_decodes_from_token_ids_with_fresh_state(smollm2_gguf: Path) -> None:
    from llama_cpp import Llama

    vocab = Llama(model_path=str(smollm2_gguf), vocab_only=True, verbose=False)
    prompt_a = vocab.tokenize(b"The capital of France is", add_bos=False)
    prompt_b = vocab.tokenize(b"def add(a, b):\n    return", add_bos=False)
    long_prompt = vocab.tokenize(b"a cat sat on the mat. " * 75, add_bos=False)  # > n_batch (512)
    # one thread: ggml's spinning barriers stall for seconds on an oversubscribed machine
    peers = LlamaCppPeers(_StubEngine(smollm2_gguf, vocab.token_eos()), threads=1)
    peers.reserve(len(long_prompt) + 8)
    for name in LLAMACPP_PEERS:
        first = peers.generate(name, prompt_a, max_new_tokens=8)
        other = peers.generate(name, prompt_b, max_new_tokens=8)
        again = peers.generate(name, prompt_a, max_new_tokens=8)
        assert 1 <= first.new_tokens <= 8 and first.wall_time > 0 and first.prompt_tokens == len(prompt_a)
        assert first.token_ids == again.token_ids != other.token_ids  # no state leaks between prompts
        assert first.finish_reason in {"stop", "length"}
    # a prompt over one n_batch with the draft model (its score buffer once held only n_batch rows)
    assert len(long_prompt) > 512
    assert peers.generate("llama.cpp-pld", long_prompt, max_new_tokens=2).new_tokens >= 1
    assert peers.llm("llama.cpp", 64).n_ctx() == context_size(len(long_prompt) + 8, 8192)  # built once
    peers.close()


@pytest.mark.integration
def test_llama_cpp_peers_race_the_real_model(smollm2_gguf: Path) -> None:
    import casspec

    engine = casspec.load()
    if getattr(engine, "gguf_path", None) is None:
        engine = GGUFEngine(engine, smollm2_gguf)
    cfg = BenchConfig(methods=["ar", *LLAMACPP_PEERS], max_new_tokens=8, warmup_tokens=2, threads=1)
    q = Question(81, "mt_bench", "writing", ["Write one sentence about the sea."])
    recs = run_model(engine, [q], cfg, progress=False)
    by = {r["method"]: r for r in recs}
    assert set(by) == {"ar", *LLAMACPP_PEERS}
    for name in LLAMACPP_PEERS:
        r = by[name]
        assert r["error"] is None and r["new_tokens"] >= 1 and r["lossless"] is None
        assert isinstance(r["identical_to_ar"], bool)
        assert r["first_departure"] is None if r["identical_to_ar"] else 0 <= r["first_departure"] <= 8
