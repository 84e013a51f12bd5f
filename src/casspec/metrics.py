"""Run statistics. Convention (vLLM): acceptance length counts the bonus token."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class DrafterStats:
    """Per-drafter counters over one generation."""

    proposed: int = 0  # draft tokens put in trees
    accepted: int = 0  # draft tokens on accepted paths
    forwards: int = 0  # model forwards spent drafting (0 for prompt lookup)
    time: float = 0.0  # seconds spent drafting

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


@dataclass
class GenerationStats:
    """What one generate() call did and how fast."""

    method: str
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (not computed)
    new_tokens: int = 0
    wall_time: float = 0.0  # seconds, prefill included (Spec-Bench convention)
    prefill_time: float = 0.0
    draft_time: float = 0.0
    verify_time: float = 0.0
    target_forwards: int = 0  # verification forwards, prefill excluded
    accept_lengths: list[int] = field(default_factory=list)  # tokens committed per step, bonus included
    drafters: dict[str, DrafterStats] = field(default_factory=dict)
    finish_reason: str = "length"  # "stop" (EOS or stop string) | "length"
    built: list[str] = field(default_factory=list)  # weights or models made inside this generation (load() makes them)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_time if self.wall_time > 0 else 0.0

    @property
    def mean_accepted_length(self) -> float:
        n = len(self.accept_lengths)
        return sum(self.accept_lengths) / n if n else 0.0

    def drafter(self, name: str) -> DrafterStats:
        return self.drafters.setdefault(name, DrafterStats())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tokens_per_s"] = self.tokens_per_s
        d["mean_accepted_length"] = self.mean_accepted_length
        for name, s in self.drafters.items():
            d["drafters"][name]["acceptance"] = s.acceptance
        return d


@dataclass
class GenerationResult:
    """Output of Engine.generate: decoded text, new token ids, and stats."""

    text: str
    token_ids: list[int]
    stats: GenerationStats
    logprobs: list | None = None  # [TokenLogprob] per token id when asked for (verify/logprobs.py)

    def to_dict(self) -> dict:
        d = {"text": self.text, "token_ids": self.token_ids, "stats": self.stats.to_dict()}
        if self.logprobs is not None:
            d["logprobs"] = [lp.to_dict() for lp in self.logprobs]
        return d


@dataclass
class StreamChunk:
    """One streamed piece: new text, the token ids it came from, and the result on the last chunk."""

    text: str
    token_ids: list[int]
    result: GenerationResult | None = None
    logprobs: list | None = None  # [TokenLogprob] per token id when asked for
