"""Spec-Bench prompts: load `question.jsonl` (Xia et al., arXiv 2401.07851) and pick a subset.

Each line holds `question_id`, `category` and `turns` (user turns). As in Spec-Bench's
`evaluation/speed.py`, the eight MT-bench categories are pooled into one group, "mt_bench";
the other five subtasks (translation, summarization, qa, math_reasoning, rag) are their own group.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

MT_BENCH_CATEGORIES: tuple[str, ...] = (
    "writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities",
)
SPEC_BENCH_GROUPS: tuple[str, ...] = (
    "mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag",
)
ENV_VAR = "CASSPEC_SPEC_BENCH"
_REL_PATH = Path("..") / "shared" / "data" / "spec_bench" / "question.jsonl"


@dataclass
class Question:
    """One Spec-Bench item. `category` is the reporting group, `subcategory` the file's own label."""

    question_id: int
    category: str
    subcategory: str
    turns: list[str]
    reference: list[str] = field(default_factory=list)


def group_of(category: str) -> str:
    """The Spec-Bench reporting group of a file category ("writing" -> "mt_bench")."""
    return "mt_bench" if category in MT_BENCH_CATEGORIES else category


def repo_root() -> Path:
    """The checkout root (src/casspec/bench/prompts.py -> three levels up from the package)."""
    return Path(__file__).resolve().parents[3]


def default_prompts_path() -> Path:
    """`$CASSPEC_SPEC_BENCH`, else `../shared/data/spec_bench/question.jsonl` from CWD, then from the repo root."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    candidates = [Path.cwd() / _REL_PATH, repo_root() / _REL_PATH]
    for path in candidates:
        if path.is_file():
            return path.resolve()
    tried = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(
        f"Spec-Bench question.jsonl not found (tried {tried}); pass --prompts FILE or set {ENV_VAR}"
    )


def parse_categories(spec: str | list[str] | None) -> list[str] | None:
    """"mt_bench,qa" -> ["mt_bench", "qa"]; None/"" -> None (all)."""
    if spec is None:
        return None
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [s.strip() for s in items if s.strip()]
    return names or None


def load_questions(
    path: str | Path | None = None,
    categories: str | list[str] | None = None,
    limit: int | None = None,
) -> list[Question]:
    """Read a Spec-Bench-format jsonl, keep `categories` (group or file labels), first `limit` per group.

    `limit` counts per reporting group in file order, so `limit=1` on the full file gives one
    MT-bench question (id 81, writing) plus one of each other subtask: 6 questions, 7 turns.
    File labels named explicitly (`categories="coding,math"`) are limited each on their own.
    """
    path = Path(path) if path is not None else default_prompts_path()
    wanted = parse_categories(categories)
    questions: list[Question] = []
    per_group: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                sub = str(obj["category"])
                q = Question(int(obj["question_id"]), group_of(sub), sub,
                             [str(t) for t in obj["turns"]], list(obj.get("reference") or []))
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{lineno}: not a Spec-Bench question line ({e})") from e
            if not q.turns:
                raise ValueError(f"{path}:{lineno}: question {q.question_id} has no turns")
            if wanted is not None and q.category not in wanted and q.subcategory not in wanted:
                continue
            # a group named in `categories` counts as one; a file label named alone counts on its own
            key = q.subcategory if wanted and q.category not in wanted else q.category
            if limit is not None and per_group.get(key, 0) >= limit:
                continue
            per_group[key] = per_group.get(key, 0) + 1
            questions.append(q)
    if wanted is not None:
        known = {q.category for q in questions} | {q.subcategory for q in questions}
        missing = [c for c in wanted if c not in known]
        if missing and not questions:
            raise ValueError(f"no questions in {path} for categories {missing}")
    return questions


OVERALL = "overall"  # the row/column over every category of a race


def group_order(groups: set[str] | list[str]) -> list[str]:
    """Spec-Bench's group order first (mt_bench, translation, ...), then any others sorted."""
    known = [g for g in SPEC_BENCH_GROUPS if g in groups]
    return known + sorted(g for g in groups if g not in SPEC_BENCH_GROUPS)
