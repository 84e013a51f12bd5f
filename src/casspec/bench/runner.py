"""The race: every method on every Spec-Bench prompt, side by side, on one already-loaded engine.

Fairness rules (STYLE.md 3(c) example 12, Spec-Bench `evaluation/eval.py`):
- one untimed warm-up generation per method before anything is timed;
- prompts interleaved (prompt 1 all methods, prompt 2 all methods, ...) and the method order
  rotated per prompt and repeat, so slow drift (thermal, caches) does not favour a method;
- the same budget and sampling parameters for all; wall time measured by the harness around
  the call, device synced, prefill included;
- MT-bench turn 2 is asked after the method's *own* turn-1 answer.
Greedy losslessness: each method's token ids are compared with "ar"'s for the same prompt/turn;
a mismatch is explained by a teacher-forced target forward (see `compare.py`). The llama.cpp
peers are approximate (quantized activations): for them the race reports the first departure from
"ar" instead, and they are skipped, with one message, when llama_cpp or the model's GGUF is missing.
"""
from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from casspec.errors import InvalidRequestError
from casspec.runtime import heap

from .compare import compare_to_reference
from .llamacpp import LLAMACPP_PEERS, LlamaCppPeers, skip_message, unavailable_reason
from .peers import HF_PEERS, HFPeers, Outcome, eos_ids, model_device, sync
from .prompts import Question

BASELINE = "ar"
Record = dict[str, Any]


@dataclass
class BenchConfig:
    """Everything that must be equal across methods in one race."""

    methods: list[str] | None = None  # None: engine.methods + HF_PEERS + LLAMACPP_PEERS (if peers)
    peers: bool = True
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0  # engine methods only: the peers here take no min_p, so they sit out a race that sets it
    repeats: int = 1
    seed: int = 0  # sampling: prompt q, turn t uses seed + 10 q + t, the same for every method
    sampling_rule: str = "gumbel"  # engine methods at temperature > 0: "gumbel" (seed-stable) or "rejection"
    warmup_tokens: int = 8
    near_tie_eps: float = 1e-3  # |logit(ar tok) - logit(method tok)| at or below this: a near-tie
    threads: int | None = None  # llama.cpp threads; None: torch's intra-op thread count

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise InvalidRequestError("max_new_tokens must be >= 1")
        if self.repeats < 1:
            raise InvalidRequestError("repeats must be >= 1")
        if not self.temperature >= 0:
            raise InvalidRequestError("temperature must be >= 0")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequestError("min_p must be in [0, 1]")


def resolve_methods(engine: Any, cfg: BenchConfig) -> list[str]:
    """The racers, baseline "ar" first (added if missing: every speedup is relative to it)."""
    peers = list(HF_PEERS) + list(LLAMACPP_PEERS)
    known = list(engine.methods) + peers
    methods = list(cfg.methods) if cfg.methods else known
    if not cfg.peers:
        methods = [m for m in methods if m not in peers]
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise InvalidRequestError(f"unknown method(s) {unknown}; {engine.name} has: {', '.join(known)}")
    if BASELINE not in engine.methods:
        raise InvalidRequestError(f"engine {engine.name} has no {BASELINE!r} baseline method")
    ordered = [BASELINE] + [m for m in methods if m != BASELINE]
    return list(dict.fromkeys(ordered))


def rotate(methods: list[str], k: int) -> list[str]:
    """Method order for the k-th timed round: a rotation, so each method leads in turn."""
    k %= len(methods)
    return methods[k:] + methods[:k]


def build_prompt(question: Question, turn: int, history: list[str], chat: bool) -> str | list[dict]:
    """Turn `turn` (0-based) after the method's own earlier answers `history`.

    Chat models get a messages list; base models a plain "Question: ...\\nAnswer:" transcript.
    """
    if chat:
        messages: list[dict] = []
        for i in range(turn):
            messages += [{"role": "user", "content": question.turns[i]},
                         {"role": "assistant", "content": history[i]}]
        return messages + [{"role": "user", "content": question.turns[turn]}]
    text = ""
    for i in range(turn):
        text += f"Question: {question.turns[i]}\nAnswer:{history[i]}\n\n"
    return text + f"Question: {question.turns[turn]}\nAnswer:"


class Race:
    """One engine, its peers, and the per-call plumbing shared by warm-up and timed runs."""

    def __init__(self, engine: Any, cfg: BenchConfig) -> None:
        cfg.validate()
        self.engine = engine
        if getattr(engine, "prefix_cache", None) is not None:  # every method prefills its prompt, as llama.cpp's
            engine.prefix_cache = None  # peer does (reset per prompt): no method reuses another's prefix KV
        self.cfg = cfg
        self.methods = resolve_methods(engine, cfg)
        self.chat = bool(engine.has_chat_template)
        self.rule = {"sampling_rule": cfg.sampling_rule} if cfg.temperature > 0 else {}  # greedy: nothing to pass
        self.device = engine.runner.device if hasattr(engine, "runner") else model_device(engine.hf_model)
        self.skipped: list[str] = []  # one message per reason a requested peer cannot race
        unfiltered = [m for m in self.methods if m in HF_PEERS or m in LLAMACPP_PEERS]
        if cfg.min_p > 0 and cfg.temperature > 0 and unfiltered:
            self.skipped.append(f"{', '.join(unfiltered)} skipped: min_p is not passed to the peers")
            self.methods = [m for m in self.methods if m not in unfiltered]
        self.peers = HFPeers(engine) if any(m in HF_PEERS for m in self.methods) else None
        self.eos = sorted(eos_ids(engine))
        self.llamacpp: LlamaCppPeers | None = None
        wanted = [m for m in self.methods if m in LLAMACPP_PEERS]
        reason = unavailable_reason(engine) if wanted else None
        if reason:
            self.skipped.append(skip_message(wanted, reason))
            self.methods = [m for m in self.methods if m not in wanted]
        elif wanted:
            self.llamacpp = LlamaCppPeers(engine, threads=cfg.threads)

    def prompt_ids(self, prompt: str | list[dict]) -> list[int]:
        return list(self.engine.encode_prompt(prompt, chat=self.chat))

    def reserve(self, questions: list[Question]) -> None:
        """Size the llama.cpp context once: longest prompt (earlier answers at full budget) + budget."""
        if self.llamacpp is None:
            return
        budget = self.cfg.max_new_tokens + 16  # +16: a re-encoded answer may take a few more tokens
        need = 0
        for q in questions:
            for t in range(len(q.turns)):
                try:
                    n = len(self.prompt_ids(build_prompt(q, t, [""] * t, self.chat)))
                except ValueError:  # the timed call reports it; a larger prompt rebuilds the Llama
                    continue
                need = max(need, n + t * budget)
        self.llamacpp.reserve(need + budget)

    def generate(self, method: str, prompt: str | list[dict], ids: list[int],
                 max_new_tokens: int, seed: int | None) -> Outcome:
        """One timed generation by `method` (an engine method, an HF peer or a llama.cpp peer)."""
        cfg = self.cfg
        if method in HF_PEERS:
            assert self.peers is not None
            return self.peers.generate(method, ids, max_new_tokens=max_new_tokens,
                                       temperature=cfg.temperature, top_p=cfg.top_p,
                                       top_k=cfg.top_k, seed=seed)
        if method in LLAMACPP_PEERS:
            assert self.llamacpp is not None
            return self.llamacpp.generate(method, ids, max_new_tokens=max_new_tokens,
                                          temperature=cfg.temperature, top_p=cfg.top_p,
                                          top_k=cfg.top_k, seed=seed)
        sync(self.device)
        t0 = time.perf_counter()
        res = self.engine.generate(prompt, method=method, max_new_tokens=max_new_tokens,
                                   temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                   min_p=cfg.min_p, seed=seed, chat=self.chat, **self.rule)
        sync(self.device)
        wall = time.perf_counter() - t0
        st = res.stats
        drafters = {k: asdict(v) if hasattr(v, "__dataclass_fields__") else v
                    for k, v in (st.drafters or {}).items()}
        return Outcome(text=res.text, token_ids=list(res.token_ids), wall_time=wall,
                       prompt_tokens=st.prompt_tokens or len(ids), new_tokens=len(res.token_ids),
                       target_forwards=st.target_forwards, accept_lengths=list(st.accept_lengths),
                       engine_wall_time=st.wall_time, finish_reason=st.finish_reason,
                       drafters=drafters)

    def warm_up(self, question: Question) -> dict[str, str]:
        """One short untimed generation per method; returns {method: error} for those that failed."""
        prompt = build_prompt(question, 0, [], self.chat)
        ids = self.prompt_ids(prompt)
        failed: dict[str, str] = {}
        for method in self.methods:
            try:
                budget = min(self.cfg.warmup_tokens, self.cfg.max_new_tokens)
                self.generate(method, prompt, ids, budget, self.cfg.seed)
            except Exception as e:  # noqa: BLE001 - reported, the race goes on without it
                failed[method] = f"{type(e).__name__}: {e}"
        return failed


def _record(engine: Any, q: Question, method: str, turn: int, repeat: int,
            out: Outcome | None, error: str | None, cfg: BenchConfig) -> Record:
    """One results.jsonl line; `choices` mirrors a Spec-Bench answer-file entry for this turn."""
    steps = None if out is None else (out.target_forwards if out.target_forwards is not None
                                      else out.new_tokens)
    return {
        "model": engine.name, "model_id": f"{engine.name}-{method}", "method": method,
        "question_id": q.question_id, "category": q.category, "subcategory": q.subcategory,
        "turn": turn + 1, "repeat": repeat,
        "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
        "prompt_tokens": None if out is None else out.prompt_tokens,
        "new_tokens": 0 if out is None else out.new_tokens,
        "wall_time": None if out is None else out.wall_time,
        "engine_wall_time": None if out is None else out.engine_wall_time,
        "tokens_per_s": (out.new_tokens / out.wall_time) if out and out.wall_time > 0 else None,
        "target_forwards": None if out is None else out.target_forwards,
        "accept_lengths": None if out is None else out.accept_lengths,
        "finish_reason": None if out is None else out.finish_reason,
        "drafters": {} if out is None else out.drafters,
        "text": "" if out is None else out.text,
        "token_ids": [] if out is None else out.token_ids,
        "lossless": None, "mismatch": None, "identical_to_ar": None, "first_departure": None,
        "error": error,
        "answer_id": uuid.uuid4().hex[:22], "tstamp": time.time(),
        "choices": [{"index": 0, "turns": ["" if out is None else out.text],
                     "decoding_steps": [steps], "new_tokens": [0 if out is None else out.new_tokens],
                     "wall_time": [None if out is None else out.wall_time]}],
    }


def run_model(engine: Any, questions: list[Question], cfg: BenchConfig, *,
              progress: bool = True, on_record: Callable[[Record], None] | None = None,
              log: Callable[[str], None] | None = None) -> list[Record]:
    """Race every method on `questions` with an already-loaded `engine`; returns all records."""
    from tqdm.auto import tqdm

    race = Race(engine, cfg)
    for msg in race.skipped:  # shown even without a progress bar: the user asked for that peer
        (log or _warn)(f"[bench] {msg}")
    records: list[Record] = []
    if not questions:
        return records
    race.reserve(questions)
    total = sum(len(q.turns) for q in questions) * len(race.methods) * cfg.repeats
    bar = tqdm(total=total, desc=f"bench {engine.name}", unit="gen", disable=not progress,
               dynamic_ncols=True)
    say = log or (lambda msg: tqdm.write(msg) if progress else None)
    for method, err in race.warm_up(questions[0]).items():
        say(f"[bench] warm-up of {method} failed: {err}")
    rnd = 0
    for q in questions:
        history: dict[str, list[str]] = {m: [] for m in race.methods}
        for turn in range(len(q.turns)):
            block = _run_turn(race, q, turn, history, rnd, bar)
            rnd += cfg.repeats
            for rec in block:
                if on_record:
                    on_record(rec)
            records += block
    bar.close()
    if race.llamacpp is not None:
        race.llamacpp.close()
    return records


def _warn(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _run_turn(race: Race, q: Question, turn: int, history: dict[str, list[str]],
              rnd: int, bar: Any) -> list[Record]:
    """All methods x repeats on one (question, turn), then the lossless comparison."""
    cfg, engine = race.cfg, race.engine
    prompts = {m: build_prompt(q, turn, history[m], race.chat) for m in race.methods}
    ids = {m: race.prompt_ids(p) for m, p in prompts.items()}
    seed = cfg.seed + q.question_id * 10 + turn
    block: list[Record] = []
    first: dict[str, Outcome | None] = {}
    for r in range(cfg.repeats):
        for m in rotate(race.methods, rnd + r):
            bar.set_postfix_str(f"q{q.question_id} t{turn + 1} {m}", refresh=False)
            out, err = None, None
            try:
                out = race.generate(m, prompts[m], ids[m], cfg.max_new_tokens, seed)
            except Exception as e:  # noqa: BLE001 - one failure must not end an hours-long race
                err = f"{type(e).__name__}: {e}"
            rec = _record(engine, q, m, turn, r, out, err, cfg)
            rec["_prompt_ids"] = ids[m]
            block.append(rec)
            first.setdefault(m, out)
            bar.update(1)
    for m in race.methods:  # turn 2 follows each method's own (first-repeat) answer
        out = first.get(m)
        history[m].append(out.text if out is not None else "")
    reference = getattr(engine, "reference_model", None) or engine.hf_model  # HF fp32 model, for logit gaps
    compare_to_reference(block, reference, eos=race.eos,
                         greedy=cfg.temperature == 0, near_tie_eps=cfg.near_tie_eps,
                         baseline=BASELINE, approximate=LLAMACPP_PEERS, seeded=engine.methods)
    for rec in block:
        rec.pop("_prompt_ids", None)
    return block


def run_bench(models: Iterable[str], questions: list[Question], cfg: BenchConfig, *,
              loader: Callable[[str], Any] | None = None, engines: dict[str, Any] | None = None,
              progress: bool = True, on_record: Callable[[Record], None] | None = None,
              log: Callable[[str], None] | None = None) -> list[Record]:
    """Load each model once (or take it from `engines`), race it, free it; returns all records."""
    records: list[Record] = []
    for name in models:
        if engines and name in engines:
            engine = engines[name]
        else:
            if loader is None:
                import casspec
                loader = casspec.load
            engine = loader(name)
            heap.settle()
        records += run_model(engine, questions, cfg, progress=progress, on_record=on_record, log=log)
        del engine
        heap.release()  # settled objects included: the next model should not run beside this one's
    return records
