"""Lossless at scale: `casspec` against `ar`, token by token, on every Spec-Bench prompt (first turn).

For each model and each of the 480 questions, both methods generate `--new-tokens` greedy tokens from the
same prompt ids (chat template where the model has one, else the bench's Question/Answer framing). A
mismatch is explained by the HF transformers fp32 model of the same weights: the logit gap between the
two tokens at the first differing position; |gap| <= --near-tie counts as a near tie.

    python benchmarks/lossless.py --models smollm2,gemma3-270m --out benchmarks/results/2026-11-30-lossless
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import casspec
from casspec.bench.compare import first_departure, logit_gap
from casspec.bench.prompts import load_questions


def prompt_of(engine, text: str) -> str | list[dict[str, str]]:  # noqa: ANN001 - an Engine
    return [{"role": "user", "content": text}] if engine.has_chat_template else f"Question: {text}\nAnswer:"


def check_model(name: str, new_tokens: int, near_tie: float, limit: int | None) -> dict[str, object]:
    """{"prompts", "compared", "mismatches", "near_ties", "details"} for one model."""
    engine = casspec.load(name)
    chat = engine.has_chat_template
    questions = load_questions()
    questions = questions[:limit] if limit else questions
    eos = sorted(engine.eos_ids)
    out = {"prompts": len(questions), "compared": 0, "mismatches": 0, "near_ties": 0, "details": []}
    for q in tqdm(questions, desc=name, unit="prompt"):
        prompt = prompt_of(engine, q.turns[0])
        ids = engine.encode_prompt(prompt, chat=chat)
        ref = engine.generate(prompt, method="ar", max_new_tokens=new_tokens, chat=chat).token_ids
        got = engine.generate(prompt, method="casspec", max_new_tokens=new_tokens, chat=chat).token_ids
        out["compared"] += 1
        pos = first_departure(ref, got, eos)
        if pos is None:
            continue
        out["mismatches"] += 1
        detail = {"question_id": q.question_id, "position": pos}
        if pos < len(ref) and pos < len(got):
            detail.update(logit_gap(engine.reference_model(), ids + ref[:pos], ref[pos], got[pos]))
            out["near_ties"] += int(abs(detail["gap"]) <= near_tie)
        out["details"].append(detail)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,gemma3-270m")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--near-tie", type=float, default=1e-3)
    ap.add_argument("--limit", type=int, default=None, help="first N questions only (a smoke run)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    models = {m: check_model(m, args.new_tokens, args.near_tie, args.limit) for m in args.models.split(",")}
    summary = {"models": models, "new_tokens": args.new_tokens, "near_tie_eps": args.near_tie,
               "command": "python benchmarks/lossless.py " + " ".join(
                   f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
               "seconds": round(time.perf_counter() - t0, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    for m, r in models.items():
        print(f"{m}: {r['compared']}/{r['prompts']} compared, {r['mismatches']} mismatches, {r['near_ties']} near ties")


if __name__ == "__main__":
    main()
