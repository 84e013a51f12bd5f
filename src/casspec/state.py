"""DecodeState: everything one generation carries between steps, passed explicitly."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from casspec.config import SamplingConfig
from casspec.metrics import GenerationStats
from casspec.runtime.kv_cache import SeqCache
from casspec.scheduler.acceptance import AcceptanceEstimator
from casspec.scheduler.latency import ForwardTimes
from casspec.verify.logprobs import TokenLogprob

if TYPE_CHECKING:
    from casspec.drafters.ngram import NgramIndex


@dataclass
class DecodeState:
    """Committed tokens, the shared cache, RNG and stats of one generation."""

    tokens: list[int]  # committed ids, prompt included; tokens[-1] is the next tree root (not yet cached)
    cache: SeqCache  # holds KV for tokens[:-1]
    sampling: SamplingConfig
    stats: GenerationStats
    remaining: int  # new tokens still allowed
    generator: torch.Generator | None = None
    eos_ids: frozenset[int] = field(default_factory=frozenset)
    times: ForwardTimes = field(default_factory=ForwardTimes)  # this step's timings; the step hands them to observe
    vocab_seen: int = 0  # tokens[:vocab_seen] already added to a pruned draft head's vocabulary
    lookup_run: int = 0  # tokens the root prompt-lookup continuations of the current copied stretch got committed (DyTC)
    lookup_streak: bool = False  # last round committed nothing but its root lookup continuation's tokens (DyTC)
    lookup_source: int = -1  # where that continuation goes on in tokens, while lookup_streak (DyTC)
    lookup_next: AcceptanceEstimator | None = None  # this text's next-token acceptance of lookup continuations
    ngram_index: dict[int, NgramIndex] = field(default_factory=dict)  # max_n -> prompt lookup's index of tokens
    logprobs: int | None = None  # None: no logprobs; k: each committed token's logprob and the top k
    token_logprobs: list[TokenLogprob] = field(default_factory=list)  # one per committed new token

    @property
    def ctx_len(self) -> int:
        return self.cache.length

    def max_depth(self) -> int:
        """Deepest draft worth making: accepted tokens past the budget are thrown away."""
        return max(0, self.remaining - 1)
