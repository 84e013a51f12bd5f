"""External peers raced as extra methods: Hugging Face `generate` on the engine's own HF model.

- "hf":        plain `generate` (greedy when temperature is 0)
- "hf_pld":    `generate(prompt_lookup_num_tokens=10)`  (HF prompt lookup decoding)
- "hf_assist": `generate(assistant_model=<int8 dynamic-quantized copy of the HF model>)`  (HF assisted generation)

All three take the same prompt token ids, budget and sampling parameters as the engine's methods,
and stop on the model's EOS ids like the engine does.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from casspec.errors import ContextOverflowError, InvalidRequestError

HF_PEERS: tuple[str, ...] = ("hf", "hf_pld", "hf_assist")
PLD_NUM_TOKENS = 10  # HF prompt lookup: tokens copied per match


@dataclass
class Outcome:
    """What one timed generation produced, engine method or peer alike."""

    text: str
    token_ids: list[int]
    wall_time: float  # seconds, measured by the harness around the call (prefill included)
    prompt_tokens: int
    new_tokens: int
    target_forwards: int | None = None
    accept_lengths: list[int] | None = None
    engine_wall_time: float | None = None  # the engine's own stats.wall_time
    finish_reason: str | None = None
    drafters: dict[str, Any] = field(default_factory=dict)


def model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def sync(device: torch.device) -> None:
    """Wait for queued device work so a timer read means what it says (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def eos_ids(engine: Any) -> set[int]:
    """EOS ids of the target: the engine's own, else generation_config's (int or list) plus the tokenizer's."""
    if getattr(engine, "eos_ids", None):
        return {int(i) for i in engine.eos_ids}
    ids: set[int] = set()
    gen_cfg = getattr(engine.hf_model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None)
    if eos is None:
        eos = getattr(getattr(engine.hf_model, "config", None), "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(e) for e in eos)
    tok_eos = getattr(engine.tokenizer, "eos_token_id", None)
    if isinstance(tok_eos, int):
        ids.add(tok_eos)
    return ids


def clipped_budget(engine: Any, prompt_ids: list[int], max_new_tokens: int) -> int:
    """New tokens a peer may generate: the budget clipped to the context, as the engine clips it."""
    max_new = min(max_new_tokens, int(engine.context_length) - len(prompt_ids))
    if max_new <= 0:
        raise ContextOverflowError(f"prompt of {len(prompt_ids)} tokens leaves no room in context "
                                   f"{engine.context_length}")
    return max_new


class HFPeers:
    """Runs the HF peers for one engine; the int8 assistant is built once, on first use (untimed)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.model = engine.reference_model() if hasattr(engine, "reference_model") else engine.hf_model
        self.device = model_device(self.model)
        self.eos = sorted(eos_ids(engine))
        self._assistant: Any = None

    @property
    def assistant(self) -> Any:
        if self._assistant is None:
            self._assistant = int8_hf_model(self.model)
        return self._assistant

    def _kwargs(self, name: str, max_new: int, temperature: float, top_p: float, top_k: int) -> dict:
        pad = getattr(self.engine.tokenizer, "pad_token_id", None)
        kw: dict[str, Any] = {
            "max_new_tokens": max_new,
            "eos_token_id": self.eos or None,
            "pad_token_id": pad if pad is not None else (self.eos[0] if self.eos else None),
        }
        if temperature > 0:
            kw.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
        else:  # greedy; clear sampling fields a checkpoint's generation_config may carry
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if name == "hf_pld":
            kw["prompt_lookup_num_tokens"] = PLD_NUM_TOKENS
        elif name == "hf_assist":
            kw["assistant_model"] = self.assistant
        elif name != "hf":
            raise InvalidRequestError(f"unknown HF peer {name!r}; known: {', '.join(HF_PEERS)}")
        return kw

    @torch.no_grad()
    def generate(self, name: str, prompt_ids: list[int], *, max_new_tokens: int,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None) -> Outcome:
        """One timed HF generation. The budget is clipped to the context like the engine clips it."""
        max_new = clipped_budget(self.engine, prompt_ids, max_new_tokens)
        kw = self._kwargs(name, max_new, temperature, top_p, top_k)
        input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        attention_mask = torch.ones_like(input_ids)
        if seed is not None:
            torch.manual_seed(seed)
        sync(self.device)
        t0 = time.perf_counter()
        out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kw)
        sync(self.device)
        wall = time.perf_counter() - t0
        new_ids = [int(t) for t in out[0, len(prompt_ids):].tolist()]
        finish = "stop" if new_ids and new_ids[-1] in self.eos else "length"
        text = self.engine.tokenizer.decode(new_ids, skip_special_tokens=True)
        # plain decoding: one forward per token after the prefill (prefill excluded, as in GenerationStats)
        steps = max(0, len(new_ids) - 1) if name == "hf" else None
        return Outcome(text=text, token_ids=new_ids, wall_time=wall, prompt_tokens=len(prompt_ids),
                       new_tokens=len(new_ids), target_forwards=steps, finish_reason=finish)


def int8_hf_model(model: Any) -> Any:
    """A copy of the HF model with torch.ao dynamic int8 linears: HF's own way to quantize for CPU."""
    import copy
    import warnings

    from torch import nn
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(copy.deepcopy(model), {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
