"""Server-wide counters (GET /metrics): requests by status, tokens, generation time, drafters, worker restarts."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _DrafterTotals:
    proposed: int = 0
    accepted: int = 0
    forwards: int = 0
    time: float = 0.0


@dataclass
class Metrics:
    """Server-wide counters (thread-safe)."""

    started: float = field(default_factory=time.time)
    requests: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    rejected_queue_full: int = 0
    timeouts: int = 0
    cancelled: int = 0
    generations: int = 0
    generation_errors: int = 0
    worker_restarts: int = 0  # the worker thread crashed and was restarted with a clean state
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    completion_tokens: int = 0
    generation_time: float = 0.0
    queue_time: float = 0.0
    verify_steps: int = 0
    committed_in_steps: int = 0
    drafters: dict[str, _DrafterTotals] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count_response(self, status: int) -> None:
        with self.lock:
            self.requests += 1
            self.by_status[str(status)] = self.by_status.get(str(status), 0) + 1

    def bump(self, name: str, n: int = 1) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + n)

    def record(self, stats: Any | None, new_tokens: int, wall: float, queue_time: float) -> None:
        """Add one finished (or cancelled: stats None) generation."""
        with self.lock:
            self.generations += 1
            self.queue_time += queue_time
            if stats is None:
                self.completion_tokens += new_tokens
                self.generation_time += wall
                return
            self.prompt_tokens += int(stats.prompt_tokens)
            self.cached_prompt_tokens += int(getattr(stats, "cached_tokens", 0) or 0)
            self.completion_tokens += int(stats.new_tokens)
            self.generation_time += float(stats.wall_time) or wall
            self.verify_steps += len(stats.accept_lengths)
            self.committed_in_steps += sum(stats.accept_lengths)
            for name, d in (stats.drafters or {}).items():
                t = self.drafters.setdefault(name, _DrafterTotals())
                t.proposed += d.proposed
                t.accepted += d.accepted
                t.forwards += d.forwards
                t.time += d.time

    def snapshot(self) -> dict:
        with self.lock:
            gen_t = self.generation_time
            return {
                "uptime_s": round(time.time() - self.started, 3),
                "requests": {
                    "total": self.requests,
                    "by_status": dict(sorted(self.by_status.items())),
                    "rejected_queue_full": self.rejected_queue_full,
                    "timeouts": self.timeouts,
                    "cancelled": self.cancelled,
                },
                "tokens": {
                    "prompt": self.prompt_tokens,
                    "prompt_cached": self.cached_prompt_tokens,
                    "completion": self.completion_tokens,
                    "total": self.prompt_tokens + self.completion_tokens,
                },
                "generation": {
                    "count": self.generations,
                    "errors": self.generation_errors,
                    "time_s": round(gen_t, 6),
                    "tokens_per_s": self.completion_tokens / gen_t if gen_t > 0 else 0.0,
                    "mean_queue_time_s": self.queue_time / self.generations if self.generations else 0.0,
                    "verify_steps": self.verify_steps,
                    "mean_accepted_length": self.committed_in_steps / self.verify_steps if self.verify_steps else 0.0,
                },
                "worker": {"restarts": self.worker_restarts},
                "drafters": {
                    name: {
                        "proposed": t.proposed,
                        "accepted": t.accepted,
                        "acceptance": t.accepted / t.proposed if t.proposed else 0.0,
                        "forwards": t.forwards,
                        "time_s": round(t.time, 6),
                    }
                    for name, t in sorted(self.drafters.items())
                },
            }
