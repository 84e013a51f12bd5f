"""Greedy losslessness check: token ids of every method against the "ar" baseline's.

On a mismatch at position i (0-based, among new tokens) the target is run teacher-forced on
prompt + the common prefix, and we record
    gap          = logit(ar token) - logit(method token)   at position i
    top1_top2    = logit(top-1) - logit(top-2)             at position i
A gap within `near_tie_eps` means two tokens were (numerically) tied, so batched verification
rounding can pick either: a near-tie, not a bug. A large gap means the method broke losslessness.

Approximate peers (llama.cpp: quantized activations) are not held to that: for them we record
`identical_to_ar` and `first_departure` (the first new-token index that differs) instead of `lossless`.
"""
from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import torch

Record = dict[str, Any]


def strip_eos(ids: list[int], eos: list[int] | None) -> list[int]:
    """Drop one trailing EOS, so "stopped with EOS in the ids" and "stopped, EOS dropped" compare equal."""
    if eos and ids and ids[-1] in eos:
        return ids[:-1]
    return ids


def first_mismatch(ref: list[int], got: list[int]) -> int | None:
    """First index where the sequences differ, or the shorter length if one is a prefix; None if equal."""
    for i, (a, b) in enumerate(zip(ref, got)):
        if a != b:
            return i
    return None if len(ref) == len(got) else min(len(ref), len(got))


def first_departure(ref: list[int], got: list[int], eos: list[int] | None) -> int | None:
    """First new-token index where `got` leaves `ref` (one trailing EOS ignored); None when identical.

    E.g. ref = [5, 6, 7, 2], got = [5, 6, 9] with eos [2] departs at 2; got = [5, 6, 7] is identical.
    """
    return first_mismatch(strip_eos(ref, eos), strip_eos(got, eos))


def has_weights(model: Any) -> bool:
    """Whether `model` can run a forward: not None, and not a skeleton on the meta device."""
    try:
        return next(model.parameters()).device.type != "meta"
    except (AttributeError, StopIteration):
        return False


@torch.no_grad()
def logit_gap(model: Any, prefix_ids: list[int], ref_tok: int, got_tok: int) -> dict[str, Any]:
    """Teacher-forced target logits after `prefix_ids`: gap between the two tokens and top1-top2 gap."""
    device = next(model.parameters()).device
    logits = model(input_ids=torch.tensor([prefix_ids], device=device)).logits[0, -1].float()
    top = torch.topk(logits, 2)
    return {
        "gap": float(logits[ref_tok] - logits[got_tok]),
        "top1_top2_gap": float(top.values[0] - top.values[1]),
        "ref_argmax": int(top.indices[0]),
        "ref_logit": float(logits[ref_tok]),
        "got_logit": float(logits[got_tok]),
    }


def explain_mismatch(model: Any, prompt_ids: list[int], ref: list[int], got: list[int], pos: int,
                     eos: list[int] | None, near_tie_eps: float) -> dict[str, Any]:
    """Mismatch info at `pos`; a sequence that ended there is taken to have emitted EOS."""
    end = eos[0] if eos else None
    ref_tok = ref[pos] if pos < len(ref) else end
    got_tok = got[pos] if pos < len(got) else end
    info: dict[str, Any] = {"position": pos, "ref_token": ref_tok, "token": got_tok,
                            "ref_len": len(ref), "len": len(got), "vs": "ar"}
    if ref_tok is not None and got_tok is not None and not isinstance(model, torch.nn.Module) and callable(model):
        model = model()  # the reference model, loaded on the first mismatch that needs it
    if not has_weights(model) or ref_tok is None or got_tok is None:
        info.update(gap=None, top1_top2_gap=None, near_tie=None)
        return info
    info.update(logit_gap(model, prompt_ids + ref[:pos], ref_tok, got_tok))
    info["near_tie"] = abs(info["gap"]) <= near_tie_eps
    return info


def compare_to_reference(block: list[Record], model: Any | Callable[[], Any], *, eos: list[int] | None, greedy: bool,
                         near_tie_eps: float = 1e-3, baseline: str = "ar",
                         approximate: Collection[str] = (), seeded: Collection[str] = ()) -> None:
    """Set `lossless` and `mismatch` on every record of one (question, turn) block, in place.

    Records need `_prompt_ids` and `token_ids`. The reference is the baseline's first good repeat
    (the baseline's own later repeats are checked against it too: a determinism check).
    lossless is None when not comparable: sampling, an error, no reference, or a different prompt
    (turn 2 after a turn-1 answer that already differed). Methods in `approximate` keep lossless
    None and get `identical_to_ar` and `first_departure` (the mismatch is still explained).
    Sampling: methods in `seeded` (the engine's, which share `ar`'s seed) get `same_as_ar`, whether their
    tokens equal `ar`'s for the same seed (always, under the coupled "gumbel" rule).
    """
    refs = [r for r in block if r["method"] == baseline and not r.get("error")]
    ref = min(refs, key=lambda r: r["repeat"]) if refs else None
    cache: dict[tuple, dict[str, Any]] = {}
    for rec in block:
        rec["lossless"], rec["mismatch"] = None, None
        rec["identical_to_ar"], rec["first_departure"] = None, None
        rec["same_as_ar"] = None
        if not greedy and rec["method"] in seeded and not rec.get("error") and ref is not None \
                and rec["_prompt_ids"] == ref["_prompt_ids"]:
            rec["same_as_ar"] = first_departure(ref["token_ids"], rec["token_ids"], eos) is None
        if not greedy or rec.get("error") or ref is None:
            continue
        if rec["_prompt_ids"] != ref["_prompt_ids"]:
            rec["mismatch"] = {"reason": "prompt differs from ar's (an earlier turn's answer differed)"}
            continue
        pos = first_departure(ref["token_ids"], rec["token_ids"], eos)
        if rec["method"] in approximate:
            rec["identical_to_ar"], rec["first_departure"] = pos is None, pos
        else:
            rec["lossless"] = pos is None
        if pos is not None:
            ref_ids, got = strip_eos(ref["token_ids"], eos), strip_eos(rec["token_ids"], eos)
            key = (pos, tuple(got[pos:pos + 1]))
            if key not in cache:
                cache[key] = explain_mismatch(model, ref["_prompt_ids"], ref_ids, got, pos, eos,
                                              near_tie_eps)
            rec["mismatch"] = dict(cache[key])
