"""Turn race records into numbers: Spec-Bench speedups, mean accepted length, losslessness.

Speedup (Spec-Bench `evaluation/speed.py`): per question, tok/s = sum(new_tokens over turns) /
sum(wall_time over turns); a method's tok/s for a category is the mean of that over the
category's questions; speedup = method mean tok/s / "ar" mean tok/s, over the questions both
finished. We also give `speedup_total` = (sum tokens / sum time) / (same for "ar"), the
throughput ratio, which weighs long answers more. With repeats, each turn's wall time is the
median over repeats. Mean accepted length counts the bonus token (1.00 for plain decoding).
Sampled runs (temperature > 0): `seeded_same` / `seeded_compared` count the generations of engine
methods whose tokens equal "ar"'s for the same seed (all of them under the coupled "gumbel" rule);
`seeded_differs` lists those that do not.
Approximate peers (llama.cpp) are not judged lossless; their cells count the prompts whose greedy
output was identical to "ar"'s and give the median index of the first departure over the others.
"""
from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from .prompts import OVERALL, group_order

Record = dict[str, Any]
QStat = tuple[int, float]  # (new tokens, wall seconds) of one question, turns summed


def spec_bench_speedup(method_q: list[QStat], base_q: list[QStat]) -> float | None:
    """Mean per-question tok/s of the method over that of the baseline (Spec-Bench convention)."""
    m, b = mean_tokens_per_s(method_q), mean_tokens_per_s(base_q)
    return m / b if m is not None and b else None


def throughput_ratio(method_q: list[QStat], base_q: list[QStat]) -> float | None:
    """(sum tokens / sum time) of the method over that of the baseline."""
    mt, bt = sum(t for _, t in method_q), sum(t for _, t in base_q)
    if not method_q or not base_q or mt <= 0 or bt <= 0:
        return None
    base = sum(n for n, _ in base_q) / bt
    return (sum(n for n, _ in method_q) / mt) / base if base else None


def mean_tokens_per_s(qs: list[QStat]) -> float | None:
    speeds = [n / t for n, t in qs if t and t > 0]
    return sum(speeds) / len(speeds) if speeds else None


def per_question(records: list[Record]) -> dict[tuple[str, str], dict[int, tuple[str, int, float]]]:
    """{(model, method): {question_id: (category, tokens, seconds)}}; a question with any failed turn is dropped."""
    turns: dict[tuple, list[Record]] = defaultdict(list)
    for r in records:
        turns[(r["model"], r["method"], r["question_id"], r["turn"])].append(r)
    out: dict[tuple[str, str], dict[int, tuple[str, int, float]]] = defaultdict(dict)
    broken: set[tuple] = set()
    for (model, method, qid, _), reps in sorted(turns.items(), key=lambda kv: kv[0][3]):
        key = (model, method)
        good = [r for r in reps if not r.get("error") and r.get("wall_time") is not None]
        if not good:
            broken.add((model, method, qid))
            continue
        tokens = min(good, key=lambda r: r["repeat"])["new_tokens"]
        secs = statistics.median(r["wall_time"] for r in good)
        cat, n, t = out[key].get(qid, (good[0]["category"], 0, 0.0))
        out[key][qid] = (cat, n + tokens, t + secs)
    for model, method, qid in broken:
        out[(model, method)].pop(qid, None)
    return out


def departures(recs: list[Record]) -> dict[str, Any]:
    """Departure from "ar" of approximate peers' records: compared, identical, median first index."""
    compared = [r for r in recs if r.get("identical_to_ar") is not None]
    first = [r["first_departure"] for r in compared if not r["identical_to_ar"]]
    return {"departure_compared": len(compared), "identical": len(compared) - len(first),
            "first_departure_median": statistics.median(first) if first else None}


def _cell(recs: list[Record], mq: dict[int, tuple], bq: dict[int, tuple] | None) -> dict[str, Any]:
    """Metrics of one (model, method, category) over questions `mq` (paired with baseline `bq`)."""
    shared = sorted(set(mq) & set(bq)) if bq is not None else sorted(mq)
    m_stats = [mq[q][1:] for q in shared]
    b_stats = [bq[q][1:] for q in shared] if bq is not None else []
    accept = [a for r in recs if not r.get("error") for a in (r.get("accept_lengths") or [])]
    compared = [r for r in recs if r.get("lossless") is not None]
    bad = [r for r in compared if r["lossless"] is False]
    ties = [r for r in bad if (r.get("mismatch") or {}).get("near_tie")]
    return {
        "questions": len(shared),
        "new_tokens": sum(n for n, _ in m_stats),
        "wall_time": sum(t for _, t in m_stats),
        "tokens_per_s": mean_tokens_per_s(m_stats),
        "speedup": spec_bench_speedup(m_stats, b_stats) if bq is not None else None,
        "speedup_total": throughput_ratio(m_stats, b_stats) if bq is not None else None,
        "mean_accepted_length": sum(accept) / len(accept) if accept else None,
        "compared": len(compared), "mismatches": len(bad), "near_ties": len(ties),
        "errors": sum(1 for r in recs if r.get("error")),
        "seeded_compared": sum(1 for r in recs if r.get("same_as_ar") is not None),
        "seeded_same": sum(1 for r in recs if r.get("same_as_ar")),
    } | departures(recs)


def summarize(records: list[Record], baseline: str = "ar") -> dict[str, Any]:
    """{model: {"methods", "categories", "table": {method: {category|"overall": cell}}, "mismatches", "errors"}}."""
    pq = per_question(records)
    models: dict[str, Any] = {}
    for model in dict.fromkeys(r["model"] for r in records):
        recs = [r for r in records if r["model"] == model]
        methods = list(dict.fromkeys(r["method"] for r in recs))
        cats = group_order({r["category"] for r in recs})
        base = pq.get((model, baseline))
        table: dict[str, dict[str, Any]] = {}
        for method in methods:
            mq = pq.get((model, method), {})
            row = {}
            for cat in cats + [OVERALL]:
                pick = (lambda c: True) if cat == OVERALL else (lambda c, cat=cat: c == cat)
                crecs = [r for r in recs if r["method"] == method and pick(r["category"])]
                cmq = {q: v for q, v in mq.items() if pick(v[0])}
                cbq = {q: v for q, v in base.items() if pick(v[0])} if base is not None else None
                row[cat] = _cell(crecs, cmq, cbq)
            table[method] = row
        models[model] = {
            "methods": methods, "categories": cats, "table": table,
            "mismatches": [_brief(r) | {"mismatch": r["mismatch"]} for r in recs
                           if r.get("lossless") is False],
            "errors": [_brief(r) | {"error": r["error"]} for r in recs if r.get("error")],
            "seeded_differs": [_brief(r) for r in recs if r.get("same_as_ar") is False],
        }
    return models


def departure_text(cell: dict[str, Any]) -> str:
    """"12 (1/5 identical)": median first-departure index and identical count; "n/a" if none compared."""
    n = cell.get("departure_compared", 0)
    if not n:
        return "n/a"
    median = cell.get("first_departure_median")
    return f"{'–' if median is None else f'{median:g}'} ({cell.get('identical', 0)}/{n} identical)"


def departure_section(models: dict[str, Any]) -> str:
    """report.md addendum: per model, each approximate peer's first departure from "ar" by category."""
    out: list[str] = []
    for model, s in models.items():
        peers = [m for m in s["methods"] if s["table"][m][OVERALL].get("departure_compared")]
        if not peers:
            continue
        cols = [OVERALL] + s["categories"]
        out += [f"## {model}: first departure from ar (median token index; n identical)", "",
                "llama.cpp computes with quantized activations, so its greedy output is not expected "
                "to equal `ar`'s and is not judged lossless. Per cell: the median new-token index "
                "where it first differs, over the prompts where it does, and how many compared "
                "prompts were identical.", "",
                "| method | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
        out += [f"| {m} | " + " | ".join(departure_text(s["table"][m][c]) for c in cols) + " |"
                for m in peers]
        out.append("")
    return "\n".join(out)


def _brief(r: Record) -> dict[str, Any]:
    return {k: r[k] for k in ("method", "question_id", "category", "turn", "repeat")}


def answer_lines(records: list[Record]) -> dict[str, list[dict[str, Any]]]:
    """Spec-Bench answer files, {model_id: lines}: one line per question, turns in order, first repeat's
    texts, median wall time per turn. `evaluation/speed.py` reads these as they are."""
    groups: dict[tuple, list[Record]] = defaultdict(list)
    for r in records:
        if not r.get("error"):
            groups[(r["model_id"], r["question_id"])].append(r)
    files: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for (model_id, qid), recs in groups.items():
        turns = sorted({r["turn"] for r in recs})
        by_turn = {t: sorted((r for r in recs if r["turn"] == t), key=lambda r: r["repeat"])
                   for t in turns}
        first = [by_turn[t][0] for t in turns]
        files[model_id].append({
            "question_id": qid, "category": first[0]["subcategory"], "answer_id": first[0]["answer_id"],
            "model_id": model_id, "tstamp": first[-1]["tstamp"],
            "choices": [{"index": 0, "turns": [r["text"] for r in first],
                         "decoding_steps": [r["choices"][0]["decoding_steps"][0] for r in first],
                         "new_tokens": [r["new_tokens"] for r in first],
                         "wall_time": [statistics.median(x["wall_time"] for x in by_turn[t]) for t in turns],
                         "accept_lengths": [a for r in first for a in (r["accept_lengths"] or [])]}],
        })
    return files


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def load_results(path: str | Path) -> list[Record]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def safe_name(name: str) -> str:
    """A model name or path as a file-name fragment."""
    keep = "".join(c if c.isalnum() or c in "._-" else "_" for c in name.strip("/"))
    return keep[-80:] or "model"


def write_reports(records: list[Record], out_dir: str | Path, *, meta: dict[str, Any] | None = None,
                  write_results: bool = True, plots: bool = True) -> dict[str, Any]:
    """Write results.jsonl, model_answer/*.jsonl, summary.json, report.md and PNG plots; return the summary."""
    from .render import render_markdown

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if write_results:
        write_jsonl(out / "results.jsonl", records)
    (out / "model_answer").mkdir(exist_ok=True)
    for model_id, lines in answer_lines(records).items():
        write_jsonl(out / "model_answer" / f"{safe_name(model_id)}.jsonl", lines)
    models = summarize(records)
    images: dict[str, list[str]] = {}
    if plots:
        from .plots import plot_accept_hist, plot_speedup
        for model, s in models.items():
            base = safe_name(model)
            images[model] = [plot_speedup(s, model, out / f"speedup_{base}.png"),
                             plot_accept_hist(records, model, out / f"accept_hist_{base}.png")]
    summary = {"meta": meta or {}, "models": models}
    with open(out / "summary.json", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False)
    departed = departure_section(models)
    report = render_markdown(summary, images) + ("\n" + departed if departed else "")
    (out / "report.md").write_text(report, encoding="utf-8")
    return summary
