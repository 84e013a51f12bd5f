"""llama.cpp peers raced as extra methods, through llama-cpp-python on the engine's own GGUF file.

- "llama.cpp":     `Llama.generate` on the prompt token ids (greedy: temp 0, top_k 1)
- "llama.cpp-pld": the same with `LlamaPromptLookupDecoding(num_pred_tokens=10)` as `draft_model`.
  That drafter is llama-cpp-python's Python/numpy loop, not llama.cpp's C++ n-gram lookup
  (`common/ngram-cache`), and llama-cpp-python turns on `logits_all` whenever a draft model is set.

Sampling (temperature > 0) uses the race's temperature, top-p, top-k and seed, in llama.cpp's sampler
order (top-k, top-p, then temperature), so its distribution can differ slightly from the engine's.

Both take the same prompt token ids, budget, sampling parameters and EOS ids as the engine's methods;
the harness's wall time includes the prefill. Each peer's `Llama` is built once per model (untimed,
sized for the race's longest prompt plus budget) and its KV state is reset before every prompt, so no
prompt reuses another's cache. llama.cpp computes with quantized weights and activations, so its
greedy output is not expected to equal `ar`'s: the race reports where it first departs instead.
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from casspec.errors import InvalidRequestError

from .peers import Outcome, clipped_budget, eos_ids

LLAMACPP_PEERS: tuple[str, ...] = ("llama.cpp", "llama.cpp-pld")
PLD_NUM_PRED_TOKENS = 10  # llama-cpp-python prompt lookup: tokens drafted per match
CTX_ALIGN = 256  # n_ctx is rounded up to this (llama.cpp pads the KV cache to 256 cells anyway)
INSTALL_HINT = ("llama-cpp-python is not installed (pip install 'casspec[llamacpp]', "
                "builds llama.cpp from source, ~5 min)")


def unavailable_reason(engine: Any) -> str | None:
    """Why the llama.cpp peers cannot race `engine` (no GGUF file, no llama_cpp), or None if they can."""
    gguf = getattr(engine, "gguf_path", None)
    if gguf is None:
        return "model has no GGUF file"
    if not Path(gguf).is_file():
        return f"GGUF file {gguf} not found"
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return INSTALL_HINT
    return None


def skip_message(methods: Iterable[str], reason: str) -> str:
    names = list(methods)
    return f"{', '.join(names)} peer{'s' if len(names) > 1 else ''} skipped: {reason}"


def context_size(need: int, limit: int) -> int:
    """`need` tokens rounded up to CTX_ALIGN, capped at the engine's context `limit`."""
    return min(limit, -(-max(need, 1) // CTX_ALIGN) * CTX_ALIGN)


def sampling_kwargs(temperature: float, top_p: float, top_k: int) -> dict[str, Any]:
    """`Llama.generate` sampler settings equal to the race's; every other sampler stage is off."""
    off = {"min_p": 0.0, "typical_p": 1.0, "repeat_penalty": 1.0,
           "frequency_penalty": 0.0, "presence_penalty": 0.0}
    if temperature > 0:
        return off | {"temp": temperature, "top_p": top_p, "top_k": top_k}  # top_k <= 0: no cut
    return off | {"temp": 0.0, "top_p": 1.0, "top_k": 1}


def build_llama(gguf: Path, *, n_ctx: int, threads: int, pld: bool) -> Any:
    """A `llama_cpp.Llama` on `gguf`, optionally with llama-cpp-python's prompt-lookup draft."""
    from llama_cpp import Llama

    extra: dict[str, Any] = {}
    if pld:
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
        extra["draft_model"] = LlamaPromptLookupDecoding(num_pred_tokens=PLD_NUM_PRED_TOKENS)
    # A draft model turns logits_all on inside Llama anyway, but its score buffer is sized from the
    # argument: logits_all=False there breaks every prompt longer than n_batch (512) tokens.
    return Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                 logits_all=pld, verbose=False, **extra)


def decode(llm: Any, prompt_ids: list[int], max_new: int, eos: set[int],
           sampling: dict[str, Any]) -> list[int]:
    """New token ids from `prompt_ids`, up to `max_new` or the first EOS (kept, as the engine keeps it)."""
    new_ids: list[int] = []
    stream = llm.generate(prompt_ids, reset=True, **sampling)
    try:
        for tok in stream:
            new_ids.append(int(tok))
            if new_ids[-1] in eos or len(new_ids) >= max_new:
                break
    finally:
        stream.close()
    return new_ids


class LlamaCppPeers:
    """Runs the llama.cpp peers for one engine; one `Llama` per peer, built on first use (untimed)."""

    def __init__(self, engine: Any, threads: int | None = None) -> None:
        import torch

        self.engine = engine
        self.gguf = Path(engine.gguf_path)
        self.threads = int(threads or torch.get_num_threads())  # the same cores torch gets
        self.eos = set(eos_ids(engine))
        self.n_ctx = 0  # set by `reserve`; grown (by a rebuild) if a prompt needs more
        self._llms: dict[str, Any] = {}

    def reserve(self, need: int) -> None:
        """Size the context for prompts plus budget of up to `need` tokens (call before the race)."""
        self.n_ctx = max(self.n_ctx, context_size(need, int(self.engine.context_length)))

    def llm(self, name: str, need: int) -> Any:
        """The `Llama` of peer `name`, rebuilt only if it lacks room for `need` tokens."""
        if name not in LLAMACPP_PEERS:
            raise InvalidRequestError(f"unknown llama.cpp peer {name!r}; known: {', '.join(LLAMACPP_PEERS)}")
        llm = self._llms.get(name)
        if llm is None or llm.n_ctx() < need:
            if llm is not None:
                llm.close()
            self.reserve(need)
            llm = build_llama(self.gguf, n_ctx=self.n_ctx, threads=self.threads, pld=name == "llama.cpp-pld")
            self._llms[name] = llm
        return llm

    def generate(self, name: str, prompt_ids: list[int], *, max_new_tokens: int,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None) -> Outcome:
        """One timed llama.cpp generation from a fresh KV state; the budget is clipped like the engine's."""
        max_new = clipped_budget(self.engine, prompt_ids, max_new_tokens)
        llm = self.llm(name, len(prompt_ids) + max_new)
        if max(prompt_ids) >= llm.n_vocab():
            raise InvalidRequestError(f"prompt token id {max(prompt_ids)} is outside the GGUF's "
                                      f"vocabulary of {llm.n_vocab()}")
        sampling = sampling_kwargs(temperature, top_p, top_k)
        llm.reset()  # n_tokens = 0: generate() finds no prefix to reuse and clears the KV cache
        llm.set_seed(seed if seed is not None else 0)
        t0 = time.perf_counter()
        new_ids = decode(llm, prompt_ids, max_new, self.eos, sampling)
        wall = time.perf_counter() - t0
        text = self.engine.tokenizer.decode(new_ids, skip_special_tokens=True)
        finish = "stop" if new_ids and new_ids[-1] in self.eos else "length"
        steps = max(0, len(new_ids) - 1) if name == "llama.cpp" else None  # decode evals after prefill
        return Outcome(text=text, token_ids=new_ids, wall_time=wall, prompt_tokens=len(prompt_ids),
                       new_tokens=len(new_ids), target_forwards=steps, finish_reason=finish)

    def close(self) -> None:
        for llm in self._llms.values():
            llm.close()
        self._llms.clear()
