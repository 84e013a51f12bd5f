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


def hf_tokens(engine, ids: list[int], new_tokens: int) -> list[int]:  # noqa: ANN001 - an Engine
    """HF transformers' own greedy `generate` on the fp32 model of the same weights."""
    model = engine.reference_model()
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=new_tokens, do_sample=False, eos_token_id=sorted(engine.eos_ids))
    return out[0, len(ids):].tolist()


def check_model(name: str, new_tokens: int, near_tie: float, limit: int | None, hf: int) -> dict[str, object]:
    """{"prompts", "compared", "mismatches", "near_ties", "details"} for one model; the first `hf` prompts
    also compare `ar` with HF transformers' generate ("hf_compared", "hf_mismatches", "hf_near_ties")."""
    engine = casspec.load(name)
    chat = engine.has_chat_template
    questions = load_questions()
    questions = questions[:limit] if limit else questions
    eos = sorted(engine.eos_ids)
    out = {"prompts": len(questions), "compared": 0, "mismatches": 0, "near_ties": 0, "details": [],
           "hf_compared": 0, "hf_mismatches": 0, "hf_near_ties": 0, "hf_details": []}
    for i, q in enumerate(tqdm(questions, desc=name, unit="prompt")):
        prompt = prompt_of(engine, q.turns[0])
        ids = engine.encode_prompt(prompt, chat=chat)
        ref = engine.generate(prompt, method="ar", max_new_tokens=new_tokens, chat=chat).token_ids
        got = engine.generate(prompt, method="casspec", max_new_tokens=new_tokens, chat=chat).token_ids
        if i < hf:
            _compare(out, "hf_", engine, ids, ref, hf_tokens(engine, ids, new_tokens), eos, near_tie, q.question_id)
        _compare(out, "", engine, ids, ref, got, eos, near_tie, q.question_id)
    return out


def _compare(out: dict, prefix: str, engine, ids: list[int], ref: list[int], got: list[int],  # noqa: ANN001
             eos: list[int], near_tie: float, question_id: int) -> None:
    """Count one comparison of `got` with `ref` under `prefix`; explain a mismatch by the fp32 logit gap."""
    out[f"{prefix}compared"] += 1
    pos = first_departure(ref, got, eos)
    if pos is None:
        return
    out[f"{prefix}mismatches"] += 1
    detail = {"question_id": question_id, "position": pos}
    if pos < len(ref) and pos < len(got):
        detail.update(logit_gap(engine.reference_model(), ids + ref[:pos], ref[pos], got[pos]))
        out[f"{prefix}near_ties"] += int(abs(detail["gap"]) <= near_tie)
    out[f"{prefix}details"].append(detail)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,gemma3-270m")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--near-tie", type=float, default=1e-3)
    ap.add_argument("--limit", type=int, default=None, help="first N questions only (a smoke run)")
    ap.add_argument("--hf", type=int, default=30, help="also compare ar with HF generate on the first N prompts")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    models = {m: check_model(m, args.new_tokens, args.near_tie, args.limit, args.hf) for m in args.models.split(",")}
    summary = {"models": models, "new_tokens": args.new_tokens, "near_tie_eps": args.near_tie,
               "command": "python benchmarks/lossless.py " + " ".join(
                   f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
               "seconds": round(time.perf_counter() - t0, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    for m, r in models.items():
        print(f"{m}: casspec vs ar {r['compared']}/{r['prompts']} compared, {r['mismatches']} mismatches "
              f"({r['near_ties']} near ties); ar vs HF generate {r['hf_compared']} compared, {r['hf_mismatches']} "
              f"mismatches ({r['hf_near_ties']} near ties)")


if __name__ == "__main__":
    main()
