"""DrafterPool: the draft levels of one engine, built once and shared by every method.

Each level is a DSIA "virtual" draft model (the target under an ExecutionPlan) or prompt lookup.
`prepare()` makes up front, or reads from the per-model cache, everything a first generation would
otherwise build inside itself: quantized weights, the latency model, cached layer sets.
"""
from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from casspec.drafters import fames
from casspec.drafters.layer_search import LayerSetSearch
from casspec.drafters.ngram import NgramDrafter
from casspec.drafters.self_draft import SelfDrafter
from casspec.runtime import cache_files
from casspec.runtime.plans import FULL, Act8, EarlyExit, ExecutionPlan, Int4, Int8, LowBit, PrunedVocab
from casspec.runtime.runner import TargetRunner
from casspec.runtime.vocab import DraftVocab, corpus_texts, rank_tokens
from casspec.scheduler.acceptance import AcceptanceEstimator
from casspec.scheduler.calibrate import is_calibrated, load_or_calibrate, machine_key
from casspec.scheduler.dytc import DyTC, DyTCConfig, Level
from casspec.scheduler.latency import GREEDY_VERIFY, LatencyModel

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Default draft hierarchies, strongest first, prompt lookup last. On CPU the int8 copy (acceptance ~0.98 at
# 0.4 of a target step) and prompt lookup pay; layer sparsity breaks these small models (README, "Draft
# levels"). On GPU, where a forward is launch-bound, layer sparsity is the paper's DSIA.
# A native target (GGUF blocks read in place) is bound by decoding its blocks, not by bytes: an int8 copy
# reads more than it does, so its draft is the same blocks with int8 activations ("a8").
DEFAULT_HIERARCHY = {"cpu": ("int8", "pld"), "cuda": ("skip0.4", "skip0.6", "pld"), "native": ("a8", "pld")}
FLOAT_BLOCKS = {0, 1, 30}  # F32, F16, BF16: no integer view, so no activation-quantized draft
LARGE_VOCAB = 131072
MAX_DRAFT_COST = 0.6  # a self-draft level slower than this fraction of a target step is left out of DyTC
DRAFTERS = ("a8", "a8v", "lowbit", "lowbitv", "vocab", "int8", "int8v", "int4", "int8+skip", "skip0.4", "skip0.6",
            "exit", "pld")
# Starting acceptance estimates (the EMA takes over after one window of verified tokens). A level is only
# tried while its estimate says it pays, so a pessimistic prior would never be corrected: these are the
# teacher-forced top-1 agreements measured on both models (README, "Draft levels"), rounded down.
PRIORS = {"a8": 0.9, "a8v": 0.88, "lowbit": 0.8, "lowbitv": 0.8, "vocab": 0.95, "int8": 0.95, "int8v": 0.93,
          "int4": 0.7, "int8+skip": 0.5, "skip0.4": 0.5, "skip0.6": 0.3, "exit": 0.3, "pld": 0.4}
COPY_OF = {"int8": "int8", "int8v": "int8", "int8+skip": "int8", "int4": "int4"}  # levels reading a quantized copy
_SKIP_LEVELS = {"skip0.4": (0.4, FULL), "skip0.6": (0.6, FULL), "int8+skip": (0.2, Int8())}


class DrafterPool:
    """Drafters built once per engine and shared by every method."""

    def __init__(self, runner: TargetRunner, model_name: str, cache_dir: Path | None = None,
                 hierarchy: tuple[str, ...] | None = None, tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        self.runner, self.model_name, self.cache_dir, self.tokenizer = runner, model_name, cache_dir, tokenizer
        self.hierarchy = tuple(hierarchy or default_hierarchy(runner))
        unknown = [d for d in self.hierarchy if d not in DRAFTERS]
        if unknown or not self.hierarchy:
            raise ValueError(f"unknown drafters {unknown} in hierarchy; choose from {DRAFTERS}")
        self.ngram = NgramDrafter(name="pld")
        self._self: dict[str, SelfDrafter] = {}
        self.searches: dict[str, LayerSetSearch] = {}
        self._latency: LatencyModel | None = None
        self._mixed: fames.MixedPrecision | None = None  # the lowbit levels' formats, once chosen

    def get(self, name: str) -> SelfDrafter | NgramDrafter:
        """A drafter by hierarchy name."""
        if name == "pld":
            return self.ngram
        return self.self_level(name)

    def self_level(self, name: str) -> SelfDrafter:
        """A self-draft level by hierarchy name (any but "pld")."""
        if name not in self._self:
            self._self[name] = SelfDrafter(self.runner, self._plan(name), name=name)
        return self._self[name]

    def _plan(self, name: str) -> ExecutionPlan:
        if name in ("int8", "int4"):
            return Int8() if name == "int8" else Int4()
        if name in ("int8v", "a8v", "vocab"):
            self._draft_vocab()
            return {"int8v": Int8(), "a8v": Act8(), "vocab": FULL}[name] | PrunedVocab()
        if name == "a8":
            return Act8()
        if name == "lowbit":
            self._lowbit()
            return LowBit()
        if name == "lowbitv":
            self._draft_vocab()
            head = self._lowbit().formats.get("head", fames.KEEP)
            if head != fames.KEEP:
                self.runner.draft_vocab().formats["lowbit"] = head
            return LowBit() | PrunedVocab()
        if name == "exit":
            return EarlyExit(max(1, round(0.6 * self.runner.num_layers)))
        sparsity, base = _SKIP_LEVELS[name]
        path = self.cache_dir / "layer_sets" / f"{self.model_name}-{name}.json" if self.cache_dir else None
        self.searches[name] = LayerSetSearch(self.runner, sparsity, base=base, path=path)
        return self.searches[name].plan

    def self_names(self) -> list[str]:
        """The self-draft levels of the hierarchy (int8 when it has none: the fixed baselines need one)."""
        return [d for d in self.hierarchy if d != "pld"] or ["int8"]

    def self_levels(self) -> list[SelfDrafter]:
        return [self.self_level(d) for d in self.self_names()]

    # ---- built once ---------------------------------------------------------------------------------
    def prepare(self, progress: bool = True) -> None:
        """Make (or read back) the draft weights and the latency model now, not inside a generation."""
        pending = self._pending()
        if progress and pending:
            print(f"casspec: first use of {self.model_name} here, preparing {' and '.join(pending)} (once)...",
                  file=sys.stderr, flush=True)
        for drafter in self.self_levels():
            self.runner.weights_for(drafter.plan)
        self.latency()

    def _draft_vocab(self) -> None:
        """Give the runner its DraftVocab: the core ranking is computed once per model and cached."""
        if self.runner.vocab is not None:
            return
        t0 = time.perf_counter()
        path, n = self._vocab_path(), self.runner.vocab_size
        order = cache_files.load_tensor(path, lambda t: _is_permutation(t, n), "the draft vocabulary")
        what = "draft vocabulary (read from cache)"
        if order is None:
            if self.tokenizer is None:
                raise ValueError("a pruned draft vocabulary needs the tokenizer (to rank tokens on the built-in text)")
            order = rank_tokens(self.runner, [self.tokenizer.encode(t) for t in corpus_texts()])
            what = "draft vocabulary"
            if path is not None:
                cache_files.save_tensor(path, order)
        self.runner.vocab = DraftVocab(self.runner.weights.head, order)
        self.runner.build_log.append((what, time.perf_counter() - t0))

    def _lowbit(self) -> fames.MixedPrecision:
        """Install the mixed-precision copy (drafters/fames.py) in the runner: formats chosen once per model
        and machine (cached), blocks re-encoded at load. Large vocabularies choose for the pruned head."""
        if self._mixed is not None:
            return self._mixed
        t0 = time.perf_counter()
        if self.tokenizer is None:
            raise ValueError("the lowbit level needs the tokenizer (to calibrate on the built-in text)")
        head_rows = None
        if self.runner.vocab_size >= LARGE_VOCAB:
            self._draft_vocab()
            head_rows = self.runner.draft_vocab().core_ids
        mixed = fames.load_or_choose(self.runner, self.tokenizer, head_rows, self._lowbit_path())
        self.runner.install("lowbit", fames.build(self.runner.weights, mixed.formats))
        self.runner.build_log.append((f"lowbit weights ({mixed.describe()}; cost {mixed.cost:.2f})",
                                      time.perf_counter() - t0))
        self._mixed = mixed
        return mixed

    def _lowbit_path(self) -> Path | None:
        key = self.runner.fingerprint()
        if key is None or self.cache_dir is None:
            return None
        return self.cache_dir / "lowbit" / f"{key}-{machine_key(self.model_name, self.runner)}-{fames.MAX_KL}.json"

    def _vocab_path(self) -> Path | None:
        key = self.runner.fingerprint()
        return None if key is None or self.cache_dir is None else self.cache_dir / "vocab" / f"{key}.pt"

    def _pending(self) -> list[str]:
        """What prepare() will build (named before it starts, so nothing is built here)."""
        names = set(self.self_names())
        kinds = {COPY_OF[d] for d in names if d in COPY_OF}
        out = [f"{k} weights" for k in sorted(kinds)
               if (path := self.runner.quantized_cache_path(k)) is None or not path.exists()]
        if names & {"lowbit", "lowbitv"} and ((path := self._lowbit_path()) is None or not path.exists()):
            out.append("mixed-precision draft formats (a Fisher calibration, ~30 s)")
        rows_path = self._argmax_rows_path()  # without it the greedy verify is measured again (latency())
        if (not is_calibrated(self._latency_path(), list(self._latency_plans()))
                or (rows_path is not None and not rows_path.exists())):
            out.append("a latency model")
        if {"int8v", "a8v", "vocab", "lowbitv"} & names and ((path := self._vocab_path()) is None or not path.exists()):
            out.append("a draft vocabulary")
        return out

    def _latency_plans(self) -> dict[str, ExecutionPlan]:
        greedy = {GREEDY_VERIFY: FULL} if self.runner.argmax_verifies() else {}  # a greedy verify's own cost
        return {"full": FULL, **greedy, **{d: self.self_level(d).plan for d in DRAFTERS if d in self.self_names()}}

    def _latency_path(self) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / "latency" / f"{machine_key(self.model_name, self.runner)}.json"

    def latency(self) -> LatencyModel:
        """The latency model, calibrated once per model and machine (cached on disk), with the argmax head's
        max_rows it was measured under: timed when the head is built, that choice flipped between loads on a
        noisy VM (Gemma: 3 rows in one load, 16 in the next, where the head at 11-16 rows measured 1.2-1.4x the
        full head's time), while the greedy verify's curve came from one calibration. Both are kept together:
        a cached max_rows is given to the head, and without one the greedy verify is measured again."""
        if self._latency is None:
            t0 = time.perf_counter()
            rows_path = self._argmax_rows_path()
            rows = cache_files.read_json(rows_path, _argmax_rows, "the argmax head's row count")
            if rows is not None:
                self.runner.set_argmax_rows(rows)
            self._latency, measured = load_or_calibrate(self.runner, self._latency_plans(), self._latency_path(),
                                                        remeasure=(GREEDY_VERIFY,) if rows is None else ())
            if rows is None and rows_path is not None and (head := self.runner.argmax_head()) is not None:
                cache_files.write_json(rows_path, {"max_rows": head.max_rows})
            what = "latency calibration" if measured else "latency model (read from cache)"
            self.runner.build_log.append((what, time.perf_counter() - t0))
        return self._latency

    def _argmax_rows_path(self) -> Path | None:
        """Where the argmax head's max_rows is kept beside the latency calibration (None: nothing to keep)."""
        path = self._latency_path()
        return None if path is None or not self.runner.argmax_verifies() else path.with_suffix(".argmax.json")

    def paying(self, ctx: int = 256) -> tuple[str, ...]:
        """The hierarchy without self-draft levels whose measured cost at one query token is over
        MAX_DRAFT_COST of a target step: such a level cannot pay for itself (on SmolLM2's native target,
        a8 costs 0.8 of a step), and DyTC's per-step estimates are too noisy to rule it out alone."""
        lat = self.latency()
        if not lat.knows("full"):
            return self.hierarchy
        full = lat.predict("full", 1, ctx)
        keep = tuple(d for d in self.hierarchy
                     if d == "pld" or not lat.knows(d) or lat.predict(d, 1, ctx) <= MAX_DRAFT_COST * full)
        return keep or self.hierarchy

    def dytc(self, levels: tuple[str, ...] | None = None, **switches: bool) -> DyTC:
        names = levels or self.paying()
        lv = [Level(self.get(d), AcceptanceEstimator(prior=PRIORS[d]), self.searches.get(d)) for d in names]
        return DyTC(lv, self.latency(), replace(DyTCConfig(), **switches))


def default_hierarchy(runner: TargetRunner) -> tuple[str, ...]:
    """The measured best levels for the device; large vocabularies draft with a pruned head on CPU."""
    device = runner.device.type if runner.device.type in DEFAULT_HIERARCHY else "cpu"
    if device == "cpu" and runner.weights.head.native is not None and set(runner.weights.head.qtypes) - FLOAT_BLOCKS:
        return ("a8v", "pld") if runner.vocab_size >= LARGE_VOCAB else DEFAULT_HIERARCHY["native"]
    if device == "cpu" and runner.vocab_size >= LARGE_VOCAB:
        return ("int8v", "pld")
    return DEFAULT_HIERARCHY[device]


def _argmax_rows(data: object) -> int:
    """The max_rows of a saved {"max_rows": n} (raises on anything else: the file is then measured again)."""
    if not isinstance(data, dict) or type(data.get("max_rows")) is not int or data["max_rows"] < 0:
        raise ValueError("expected {\"max_rows\": n >= 0}")
    return data["max_rows"]


def _is_permutation(order: torch.Tensor, n: int) -> bool:
    """Whether `order` ranks each of the `n` token ids exactly once (a cached ranking of this vocabulary)."""
    return (order.dtype == torch.long and tuple(order.shape) == (n,)
            and bool(torch.bincount(order.clamp(0, n), minlength=n + 1)[:n].eq(1).all()))
