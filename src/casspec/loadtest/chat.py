"""``casspec loadtest`` workloads that a prefix cache serves: multi-turn chats and a shared system prompt.

* multi-turn (``--turns N``): each client holds its own conversation for N turns, adding about
  ``--turn-tokens`` tokens of user text a turn and the server's previous answers, then starts a new one;
  TTFT is reported per turn (a server that re-prefills the whole conversation slows down turn by turn);
* shared system prompt (``--system-tokens N``): every request opens with the same ~N-token system message
  and a different question; the first request's TTFT is reported apart from the others'.

User text is random common words (seeded per client), estimated at 4 characters a token, so prompts are
distinct yet deterministic. Standard library only, like loadtest.py.
"""
from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

from casspec.loadtest.stats import summary

CHARS_PER_TOKEN = 4  # the usual estimate for English text under a BPE tokenizer
WORDS = ("the of and to in is that for it as was with be by on not this are or from at which but have an they "
         "more one all their time there would so what about when out up can into some other them these could "
         "system cache model token value memory request server answer question reason number order change "
         "water light river mountain city history language music market energy garden window library").split()


def filler(rng: random.Random, tokens: int) -> str:
    """About `tokens` tokens of sentences made of common words."""
    out, n = [], 0
    while n < tokens * CHARS_PER_TOKEN:
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 14))]
        sentence = " ".join(words).capitalize() + "."
        out.append(sentence)
        n += len(sentence) + 1
    return " ".join(out)


def system_message(tokens: int, seed: int) -> dict:
    """The shared ~`tokens`-token system message (the same for every request of a run)."""
    text = "You are a helpful assistant. Use the notes below when they help.\n" + filler(random.Random(seed), tokens)
    return {"role": "system", "content": text}


def with_system(system: dict | None, prompt: str) -> list[dict]:
    return ([system] if system else []) + [{"role": "user", "content": prompt}]


def run_conversations(run: Any, send: Callable[[list[dict]], Any], clients: int, turns: int, turn_tokens: int,
                      system: dict | None, seed: int, join_until: float) -> None:
    """Closed loop of conversations: each client sends turn after turn (its answers included) until the deadline."""
    def worker(cid: int) -> None:
        rng = random.Random(seed * 100_003 + cid)
        while time.perf_counter() < run.deadline:
            messages = [system] if system else []
            for turn in range(1, turns + 1):
                if time.perf_counter() >= run.deadline or run.try_start() != "ok":
                    return
                messages.append({"role": "user", "content": filler(rng, turn_tokens) + " What follows from this?"})
                sample = send(list(messages))
                sample.turn = turn
                run.finish(sample)
                if not sample.ok:
                    break
                messages.append({"role": "assistant", "content": sample.text})

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, join_until - time.perf_counter()))


def ttft_by_turn(samples: list) -> dict[str, dict]:
    """TTFT summary per turn number (successful streamed samples), keyed "1", "2", ..."""
    turns = sorted({s.turn for s in samples if s.ok and s.ttft is not None and s.turn})
    return {str(t): {**summary([s.ttft for s in samples if s.ok and s.ttft is not None and s.turn == t]),
                     "n": sum(1 for s in samples if s.ok and s.ttft is not None and s.turn == t)} for t in turns}


def first_and_rest(samples: list) -> tuple[float | None, dict]:
    """The TTFT of the first request sent, and a summary of the others'."""
    timed = sorted((s for s in samples if s.ok and s.ttft is not None), key=lambda s: s.seq)
    if not timed:
        return None, {}
    return (timed[0].ttft if timed[0].seq == 0 else None), summary([s.ttft for s in timed if s.seq != 0])
