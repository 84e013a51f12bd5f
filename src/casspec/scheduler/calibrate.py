"""Latency calibration: time forwards per execution plan and query size, cached per model and machine."""
from __future__ import annotations

import hashlib
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from casspec.runtime import cache_files
from casspec.runtime.backend import TimedBackend
from casspec.runtime.machine import cpu_info
from casspec.runtime.plans import ExecutionPlan
from casspec.runtime.runner import TargetRunner
from casspec.scheduler.latency import GREEDY_VERIFY, LatencyModel, calibration_grid


def time_forward(runner: TargetRunner, plan: ExecutionPlan, n_query: int, ctx_len: int, repeats: int = 3,
                 argmax_only: bool = False) -> float:
    """Median seconds of one forward of `n_query` tokens on top of `ctx_len` cached ones (one warm-up);
    `argmax_only`: as a greedy verify runs it (the argmax head where the target has one)."""
    return forward_breakdown(runner, plan, n_query, ctx_len, repeats, timed=False, argmax_only=argmax_only)["total"]


def forward_breakdown(runner: TargetRunner, plan: ExecutionPlan, n_query: int, ctx_len: int, repeats: int = 3,
                      timed: bool = True, argmax_only: bool = False) -> dict[str, float]:
    """Medians over `repeats` forwards (after one warm-up) of the total seconds and, with `timed`, of the
    seconds in the backend's linears ("matmul") and attention, from a forward run op by op, and the rest
    (total - matmul)."""
    cache = runner.new_cache(ctx_len + n_query + 1)
    cache.length = ctx_len
    ids = torch.randint(0, min(runner.vocab_size, 1000), (n_query,))
    pos = torch.arange(ctx_len, ctx_len + n_query)
    backend = runner.backend
    rows: list[dict[str, float]] = []

    def run() -> float:
        t0 = time.perf_counter()
        runner.forward(ids, pos, pos, cache, plan, argmax_only=argmax_only)
        runner.synchronize()
        return time.perf_counter() - t0

    try:
        for _ in range(repeats + 1):
            total = run()  # as decoding runs it (a fused layer call where the backend has one)
            parts = {"linear": 0.0, "attention": 0.0}
            if timed:  # the split from a forward run op by op, each op timed
                runner.backend = timer = TimedBackend(backend)
                run()
                runner.backend, parts = backend, timer.seconds
            rows.append({"total": total, "matmul": parts["linear"], "attention": parts["attention"],
                         "rest": total - parts["linear"]})
    finally:
        runner.backend = backend
    return {k: statistics.median(r[k] for r in rows[1:]) for k in rows[0]}


def machine_key(model_name: str, runner: TargetRunner) -> str:
    """Identifies (model, machine, software, kernels) for cached calibrations."""
    cpu = cpu_info()  # two CPUs that both say "x86_64" may run the kernels twice as fast as each other
    info = [model_name, platform.machine(), cpu["model"], cpu["features"], str(os.cpu_count()), torch.__version__,
            str(torch.get_num_threads()), runner.backend.name, runner.kernel_build, CALIBRATION]
    return hashlib.sha1("|".join(info).encode()).hexdigest()[:12]


CALIBRATION = "interleaved-rounds-16+greedy-verify"  # how `calibrate` measures (in the cache key: a change measures again)
ROUNDS = 3  # interleaved rounds over the small query sizes: the points that decide DyTC's trees
SMALL_QUERY = 16  # query sizes up to this one (the rows trees verify) are measured in ROUNDS rounds


def calibrate(runner: TargetRunner, plans: dict[str, ExecutionPlan], latency: LatencyModel,
              max_query: int = 32, ctx_lens: tuple[int, ...] = (64, 512), repeats: int = 2) -> None:
    """Fit `latency` with a few timed forwards per plan, query size and context length (seconds). A noisy
    2-core VM runs 10-40% slower for seconds at a time, so what is compared is measured side by side: the
    plans interleaved per point (timed one plan's curve after the other, Gemma-3's `a8v` once came out at 0.64
    of the target, over the 0.6 that keeps a level in DyTC, pool.MAX_DRAFT_COST; interleaved, its samples ran
    0.41-0.66 around a median of 0.51), and the small query sizes, whose ratios decide whether a draft token
    pays for its verify row, in ROUNDS rounds of 1, 2, ..., SMALL_QUERY each (measured one after the other,
    SmolLM2's 2-row verify came out at 1.28 of one row against ~1.15 in use, and sampled DyTC drafted nothing;
    a cost it never pays is never measured again). Up to 16 rows: Gemma's greedy verify of 6 rows, timed once
    per context, came out at 1.2x the 8-row one, and DyTC's lookup chains stopped at 2 tokens."""
    grid = calibration_grid(max_query)
    small, large = [q for q in grid if q <= SMALL_QUERY], [q for q in grid if q > SMALL_QUERY]
    for ctx in ctx_lens:
        for points in [small] * ROUNDS + [large]:
            for q in points:
                for name, plan in plans.items():
                    t = time_forward(runner, plan, q, ctx, repeats, argmax_only=name == GREEDY_VERIFY)
                    latency.observe(name, q, ctx, t)
    latency.clear_errors()


def load_or_calibrate(runner: TargetRunner, plans: dict[str, ExecutionPlan], path: Path | None,
                      remeasure: tuple[str, ...] = (), **kwargs: Any) -> tuple[LatencyModel, bool]:
    """A calibrated LatencyModel, from `path` if it holds every plan, else measured now and saved there
    (best effort: an unreadable file is measured again, an unwritable folder only means no cache);
    `remeasure`: plans measured now even where the file holds them. The flag says whether any plan was
    measured now."""
    latency = cache_files.read_json(path, _latency_state, "the latency calibration") or LatencyModel()
    for name in remeasure:
        latency.drop(name)
    missing = {k: p for k, p in plans.items() if not latency.knows(k)}
    if missing:
        calibrate(runner, missing, latency, **kwargs)
        if path is not None:
            cache_files.write_json(path, latency.state_dict())
    return latency, bool(missing)


def is_calibrated(path: Path | None, plans: list[str]) -> bool:
    """Whether `path` holds a calibration covering `plans` (without measuring anything)."""
    saved = cache_files.read_json(path, _latency_state, "the latency calibration")
    return saved is not None and all(saved.knows(p) for p in plans)


def _latency_state(data: object) -> LatencyModel:
    """A LatencyModel holding a saved state (raises on one of the wrong shape: the file is then rebuilt)."""
    latency = LatencyModel()
    latency.load_state_dict(data)  # type: ignore[arg-type]
    return latency
