"""The draft hierarchy by measurement: (acceptance, c) of every candidate draft level of one model.

Acceptance is teacher-forced top-1 agreement with the target's own greedy continuation: for each prompt,
`ar` generates N tokens; a level then runs once over that continuation (its rows see the committed
prefix's target KV and each other's own KV, as a drafted chain does) and we count how often its argmax
is the target's next token. Prompt lookup is scored the same way where it proposes. c is the level's
forward time at one query token over `--ctx` cached tokens, relative to the full model's (median).
The last column is what a chain of that level alone could give: max_k E[tokens](alpha, k) / (1 + k c),
ignoring the verify forward's growth with k.

    python benchmarks/levels.py --model smollm2 --out benchmarks/results/2026-11-29-levels-smollm2
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch

import casspec
from casspec.bench.prompts import load_questions
from casspec.decoder import SpeculativeDecoder
from casspec.drafters.layer_search import LayerSetSearch
from casspec.drafters.ngram import find_ngram_continuation
from casspec.runtime.plans import FULL, Act8, EarlyExit, ExecutionPlan, Int4, Int8, PrunedVocab
from casspec.scheduler.calibrate import forward_breakdown
from casspec.state import DecodeState

OWN_SETS = ("code_completion", "code_editing", "math_word")


def prompts(per_category: int) -> list[tuple[str, str]]:
    """(category, text): Spec-Bench questions after the first 5 of each group (the race uses those) + own sets."""
    out = [(q.category, q.turns[0]) for q in load_questions(limit=5 + per_category)]
    seen: dict[str, int] = {}
    kept = []
    for cat, text in out:
        seen[cat] = seen.get(cat, 0) + 1
        if seen[cat] > 5:
            kept.append((cat, text))
    root = Path(__file__).parent / "prompts"
    for name in OWN_SETS:
        rows = [json.loads(line) for line in open(root / f"{name}.jsonl")][-per_category:]
        kept += [(name, r["turns"][0]) for r in rows]
    return kept


def continuation(engine, text: str, n: int) -> DecodeState:
    """The target's greedy continuation, left in a DecodeState whose cache holds every token's KV."""
    chat = engine.has_chat_template  # a base model gets the bench's plain Question/Answer framing
    prompt = [{"role": "user", "content": text}] if chat else f"Question: {text}\nAnswer:"
    gen = engine.start(prompt, "ar", max_new_tokens=2 * n, chat=chat)  # KV room to score all n teacher-forced
    decoder = SpeculativeDecoder(engine.runner, engine.scheduler("ar"))
    decoder.prefill(gen.state)
    while not gen.finished and gen.state.stats.new_tokens < n:
        gen.push(decoder.step(gen.state).tokens)
    return gen.state


def agreement(engine, state: DecodeState, plan: ExecutionPlan, window: int) -> float:
    """Teacher-forced top-1 agreement of `plan` over the last `window` committed tokens."""
    if plan.vocab:
        engine.runner.draft_vocab().add(state.tokens)  # as the drafter does: the context's tokens are draftable
    return LayerSetSearch(engine.runner, 0.0, window=window).score(state, plan)


def lookup_agreement(state: DecodeState, window: int) -> tuple[float, float]:
    """Prompt lookup over the window: (fraction of positions with a proposal, its first token's acceptance)."""
    tokens = np.asarray(state.tokens, dtype=np.int64)
    proposed = hits = 0
    for t in range(len(tokens) - window, len(tokens)):
        draft, _ = find_ngram_continuation(tokens[:t], 3, 1, 1)
        if draft:
            proposed += 1
            hits += int(draft[0] == tokens[t])
    return proposed / window, hits / max(1, proposed)


def searched_skip(engine, states: list[DecodeState], sparsity: float, base: ExecutionPlan, evals: int) -> ExecutionPlan:
    """The SWIFT-style on-the-fly search of the engine, run offline over calibration continuations."""
    search = LayerSetSearch(engine.runner, sparsity, base=base, window=48, interval=1, max_evals=evals)
    for i in range(evals):
        search.maybe_step(states[i % len(states)])
    return search.plan


def levels(engine, calib: list[DecodeState], evals: int, only: set[str] | None) -> dict[str, ExecutionPlan]:
    pool = engine.pool
    pool.get("int8v")  # builds the pruned draft vocabulary
    exit_at = max(1, round(0.6 * engine.runner.num_layers))
    native = {}
    if engine.runner.weights.head.native is not None:  # the target's own blocks: activation quantization, pruned head
        native = {"a8": lambda: Act8(), "a8v": lambda: Act8() | PrunedVocab(), "vocab": lambda: PrunedVocab(),
                  "lowbit": lambda: pool.get("lowbit").plan, "lowbitv": lambda: pool.get("lowbitv").plan,
                  "a8+skip0.2": lambda: searched_skip(engine, calib, 0.2, Act8(), evals)}
    makers = {
        **native,
        "int8": lambda: Int8(), "int8v": lambda: Int8() | PrunedVocab(), "int4": lambda: Int4(),
        "int8+skip0.2": lambda: searched_skip(engine, calib, 0.2, Int8(), evals),
        "int8+skip0.4": lambda: searched_skip(engine, calib, 0.4, Int8(), evals),
        "skip0.4": lambda: searched_skip(engine, calib, 0.4, FULL, evals),
        "skip0.6": lambda: searched_skip(engine, calib, 0.6, FULL, evals),
        f"exit{exit_at}": lambda: EarlyExit(exit_at), f"int8+exit{exit_at}": lambda: Int8() | EarlyExit(exit_at),
    }
    return {name: make() for name, make in makers.items() if only is None or name in only}


def window(state: DecodeState) -> int:
    """Generated tokens that can be scored (each needs the next committed token as its target)."""
    return max(1, min(state.stats.new_tokens - 1, state.cache.length - 1))


def chain_gain(alpha: float, c: float) -> tuple[float, int]:
    """max over k of E[tokens] / (1 + k c) and the k reaching it."""
    return max((sum(alpha ** j for j in range(k + 1)) / (1 + k * c), k) for k in range(0, 13))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--per-category", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--search-evals", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--levels", default=None, help="comma-separated level names to measure (default: all)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = casspec.load(args.model)
    items = prompts(args.per_category)
    states = [(cat, continuation(engine, text, args.new_tokens)) for cat, text in items]
    calib = [s for _, s in states[::3]]  # the search sees a third of the continuations
    plans = levels(engine, calib, args.search_evals, set(args.levels.split(",")) if args.levels else None)
    full_t = forward_breakdown(engine.runner, FULL, 1, args.ctx, repeats=7)["total"]
    rows = {}
    for name, plan in plans.items():
        per_cat: dict[str, list[float]] = {}
        for cat, st in states:
            per_cat.setdefault(cat, []).append(agreement(engine, st, plan, window(st)))
        t = forward_breakdown(engine.runner, plan, 1, args.ctx, repeats=7)["total"]
        rows[name] = {"plan": plan.name, "c": t / full_t, "ms": 1e3 * t,
                      "acceptance": statistics.mean(a for v in per_cat.values() for a in v),
                      "by_category": {k: statistics.mean(v) for k, v in per_cat.items()}}
    look = [lookup_agreement(st, window(st)) for _, st in states]
    rows["pld"] = {"plan": "prompt lookup", "c": 0.0, "ms": 0.0, "acceptance": statistics.mean(a for _, a in look),
                   "proposal_rate": statistics.mean(p for p, _ in look), "by_category": {}}
    write(args, engine, rows, 1e3 * full_t, len(states))


def write(args, engine, rows: dict, full_ms: float, n: int) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": engine.name, "prompts": n, "new_tokens": args.new_tokens, "ctx": args.ctx,
            "threads": args.threads, "full_ms": full_ms, "torch": torch.__version__}
    (out / "levels.json").write_text(json.dumps({"meta": meta, "levels": rows}, indent=1))
    cats = sorted({c for r in rows.values() for c in r["by_category"]})
    lines = [f"{engine.name}: {n} prompts, {args.new_tokens} greedy tokens each, c at q=1 over {args.ctx} cached "
             f"tokens (full = {full_ms:.1f} ms)", "",
             "| level | plan | acceptance | c | ms | best chain gain (k) | " + " | ".join(cats) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(cats)]
    for name, r in rows.items():
        gain, k = chain_gain(r["acceptance"], r["c"]) if r["c"] > 0 else (float("nan"), 0)
        by = " | ".join(f"{r['by_category'].get(c, float('nan')):.3f}" for c in cats)
        extra = f" (proposes at {r['proposal_rate']:.0%} of positions)" if "proposal_rate" in r else ""
        lines.append(f"| {name} | {r['plan']} | {r['acceptance']:.3f}{extra} | {r['c']:.2f} | {r['ms']:.1f} | "
                     f"{gain:.2f} ({k}) | {by} |")
    (out / "levels.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
