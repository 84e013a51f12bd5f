"""Typed, validated request configuration."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from casspec.errors import InvalidRequestError

SAMPLING_RULES = ("gumbel", "rejection")


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling parameters; temperature 0 means greedy.

    Filters apply in this order: temperature, top-k, top-p (on the top-k survivors, renormalised),
    min-p (a ratio to the most likely token, so its place in the order changes nothing).
    """

    temperature: float = 0.0
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]
    top_k: int = 0  # 0 = no top-k truncation
    seed: int | None = None  # None: Engine draws one per request (the coupled noise needs a seed)
    min_p: float = 0.0  # keep tokens with p >= min_p * p_max, in [0, 1]; 0 = off
    rule: Literal["gumbel", "rejection"] = "gumbel"
    """How drafts are verified at temperature > 0 (verify/coupling.py, verify/accept.py):
    "gumbel": seed-stable coupled sampling; the token at position t is argmax(tempered, filtered target
        logits + Gumbel noise fixed by (seed, t)), a draft token is kept when it equals that token. Every
        method's output for a seed is token-identical to `ar`'s.
    "rejection": recursive rejection sampling (SpecInfer); same distribution, output depends on the drafts."""

    def __post_init__(self) -> None:
        t, p, k, m = self.temperature, self.top_p, self.top_k, self.min_p
        if not _is_number(t) or math.isnan(t) or math.isinf(t) or t < 0:
            raise InvalidRequestError(f"temperature must be a finite number >= 0, got {t!r}")
        if not _is_number(p) or math.isnan(p) or not 0 < p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {p!r}")
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise InvalidRequestError(f"top_k must be an integer >= 0, got {k!r}")
        if not _is_number(m) or math.isnan(m) or not 0 <= m <= 1:
            raise InvalidRequestError(f"min_p must be in [0, 1], got {m!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise InvalidRequestError(f"seed must be an integer, got {self.seed!r}")
        if self.rule not in SAMPLING_RULES:
            raise InvalidRequestError(f"sampling_rule must be one of {', '.join(SAMPLING_RULES)}, got {self.rule!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @property
    def is_coupled(self) -> bool:
        """Sampling with the seed-stable Gumbel coupling (verification is an equality test)."""
        return not self.is_greedy and self.rule == "gumbel"

    @property
    def filters(self) -> tuple[float, int, float, float]:
        """(temperature, top_k, top_p, min_p): rows with equal filters are sampled in one batched call."""
        return (self.temperature, self.top_k, self.top_p, self.min_p)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
