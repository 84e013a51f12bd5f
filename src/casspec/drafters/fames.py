"""A mixed-precision low-bit draft: each projection re-quantized to the format its sensitivity allows.

FAMES (arXiv 2411.18055) picks an approximate multiplier per layer from a Taylor estimate of how much
each choice raises the loss, instead of searching over assignments. Here the choice is a weight format
per projection (the target's own blocks, or a copy in Q8_0, Q4_0, Q3_1 or Q2_1), and the estimate is
the second-order Taylor term of the KL divergence between the target and the draft, which for a
model's own output distribution is the Fisher information:

    KL(p || q_dW) ~ 1/2 sum_i F_i dW_i^2,    F_i = E_{x, y ~ p}[(d log p(y | x) / dW_i)^2]

F comes from one backward pass per calibration chunk (labels sampled from the target itself, so it is
the true Fisher, not the empirical one), per token: a linear layer's per-token gradient is g_t x_t^T,
so F = sum_t (g_t^2)(x_t^2)^T with no per-sample backward. The assignment is the cheapest whose summed
estimate stays under an accuracy budget (MAX_KL), each format's cost per weight measured on this
machine (`format_costs`): the kernels are bound by decoding, not bytes, so a 3-bit format can cost
more than a 4-bit one and Q8_0 less than Q5_0 or Q6_K here, and the measurement says so.
The draft runs every projection with int8 activations (the a8 kernels), as the `a8` level does.
"""
from __future__ import annotations

import copy
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from casspec.runtime import cache_files, lowbit
from casspec.runtime.gguf_file import NativeTensor
from casspec.runtime.vocab import corpus_texts
from casspec.runtime.weights import ModelWeights, Proj, reencode, with_act8

if TYPE_CHECKING:
    from pathlib import Path

    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from casspec.runtime.runner import TargetRunner

KEEP = -1  # "format" of a projection that keeps the target's own blocks
# The draft's accuracy budget: the summed estimate of KL(target || draft), nats per token. Measured
# (benchmarks/levels.py, Gemma-3-270M): 0.0002 kept top-1 agreement at 0.993, 0.10 dropped it to 0.94
# and 2.2 to 0.50; so a cap well under 0.1.
MAX_KL = 0.02
CHUNK_TOKENS = 256  # calibration tokens per backward pass
CHUNKS = 2  # a few hundred calibration tokens, as FAMES uses


@dataclass
class MixedPrecision:
    """One assignment: the format of each projection ("head", "3.qkv", ...; KEEP = the target's blocks)."""

    formats: dict[str, int]
    cost: float  # predicted a8 cost of a forward's projections, as a fraction of keeping every block
    kl: float  # the summed Fisher estimate of KL(target || draft) per calibration token

    def describe(self) -> str:
        """e.g. "62 Q8_0, 10 Q4_0, 1 own"."""
        counts = Counter("own" if t == KEEP else lowbit.name(t) for t in self.formats.values())
        return ", ".join(f"{n} {name}" for name, n in counts.most_common())


def load_or_choose(runner: TargetRunner, tokenizer: PreTrainedTokenizerBase, head_rows: torch.Tensor | None,
                   path: Path | None, max_kl: float = MAX_KL) -> MixedPrecision:
    """The assignment for this model and machine: read from `path`, else estimated, chosen and saved
    (tens of seconds, once: an fp32 copy of the model, a backward pass per chunk, every candidate's error)."""
    cached = cache_files.read_json(path, _parse, "the mixed-precision formats")
    if cached is not None:
        return cached
    model = fp32_model(runner)
    sens = sensitivities(model, fisher(model, calibration_chunks(tokenizer)), runner.adapter.module_keys(), head_rows)
    del model
    mixed = choose(sens, *_projection_costs(runner, head_rows), max_kl)
    if path is not None:
        cache_files.write_json(path, {"formats": mixed.formats, "cost": mixed.cost, "kl": mixed.kl})
    return mixed


def _parse(data: object) -> MixedPrecision:
    if not isinstance(data, dict) or not isinstance(data.get("formats"), dict):
        raise ValueError("not a mixed-precision assignment")
    formats = {str(k): int(v) for k, v in data["formats"].items()}
    if any(t != KEEP and t not in lowbit.CANDIDATES for t in formats.values()):
        raise ValueError("unknown formats")
    return MixedPrecision(formats, float(data["cost"]), float(data["kl"]))


def _projection_costs(runner: TargetRunner, head_rows: torch.Tensor | None
                      ) -> tuple[dict[str, float], dict[str, int], dict[int, float]]:
    """What `choose` weighs: each projection's cost as it is, its weights (the head: the rows a pruned head
    reads), and each format's cost per weight (measured where the kernels run; else bytes per weight)."""
    from casspec.runtime import kernels

    projs = runner.weights.named_projections()
    weights = {key: (p.n if key != "head" or head_rows is None else int(head_rows.numel())) * p.k
               for key, p in projs.items()}
    own = {key: list(zip(p.sizes, p.qtypes)) if p.native is not None else [(p.n, 0)] for key, p in projs.items()}
    qtypes = {t for parts in own.values() for _, t in parts} | set(lowbit.CANDIDATES)
    if runner.backend is not runner.torch_backend and kernels.available():
        costs = format_costs(kernels.module(), qtypes)
    else:
        costs = {t: lowbit.row_bytes(t, 1024) / 1024 for t in qtypes}
    own_cost = {key: sum(n * costs[t] for n, t in parts) / projs[key].n * weights[key] for key, parts in own.items()}
    return own_cost, weights, costs


def calibration_chunks(tokenizer: PreTrainedTokenizerBase, chunks: int = CHUNKS) -> list[list[int]]:
    """Token ids of the built-in calibration text (runtime/vocab_corpus.txt) in chunks of CHUNK_TOKENS."""
    ids = [t for text in corpus_texts() for t in tokenizer.encode(text)][: chunks * CHUNK_TOKENS]
    return [ids[i:i + CHUNK_TOKENS] for i in range(0, len(ids), CHUNK_TOKENS)]


# ---- the estimate -------------------------------------------------------------------------------
def fp32_model(runner: TargetRunner) -> PreTrainedModel:
    """The target as an fp32 HF model with autograd (a GGUF file's values in a fresh model of its config)."""
    model = cast("PreTrainedModel", runner.model)
    if runner.source is not None:
        return runner.source.dequantized_model(model.config)
    return model if next(model.parameters()).dtype == torch.float32 else copy.deepcopy(model).float()


def fisher(model: PreTrainedModel, chunks: list[list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Diagonal Fisher [N, K] of every linear module's weight over `chunks` of token ids."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    acc = {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in linears.items()}
    handles = []

    def watch(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            x2 = args[0].detach().reshape(-1, args[0].shape[-1]).float().square()  # [T, K]

            def grad(g: torch.Tensor) -> None:  # g [.., N]: dL/d(output) at every token
                acc[name].addmm_(g.reshape(-1, g.shape[-1]).float().square().T, x2)
            out.register_hook(grad)
        return hook

    embed = model.get_input_embeddings()
    handles.append(embed.register_forward_hook(lambda _m, _a, out: out.detach().requires_grad_()))
    handles += [m.register_forward_hook(watch(n)) for n, m in linears.items()]
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    try:
        for ids in chunks:
            logits = model(torch.tensor([ids])).logits[0].float()  # [T, V]
            y = torch.multinomial(torch.softmax(logits.detach(), dim=-1), 1, generator=gen)[:, 0]  # y ~ p
            F.cross_entropy(logits, y, reduction="sum").backward()
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
    tokens = sum(len(c) for c in chunks)
    return {n: a / tokens for n, a in acc.items()}


def sensitivities(model: PreTrainedModel, fish: dict[str, torch.Tensor], keys: dict[str, str],
                  head_rows: torch.Tensor | None, candidates: tuple[int, ...] = lowbit.CANDIDATES
                  ) -> dict[str, dict[int, float]]:
    """Projection key -> format -> 1/2 sum F dW^2 (KEEP: 0), over the linear modules `keys` names (HF module name
    -> key, LlamaAdapter.module_keys); the head over `head_rows` only (a pruned draft head)."""
    out: dict[str, dict[int, float]] = {}
    for name, module in model.named_modules():
        key = keys.get(name)
        if key is None or name not in fish:
            continue
        w, f = module.weight.detach().float(), fish[name]
        if key == "head" and head_rows is not None:
            w, f = w[head_rows], f[head_rows]
        s = out.setdefault(key, {KEEP: 0.0})
        for t in candidates:
            dw = NativeTensor(lowbit.encode(w, t), t, (w.shape[0], w.shape[1])).dequantize() - w
            s[t] = s.get(t, 0.0) + 0.5 * float((f * dw.square()).sum())
    return out


# ---- the cost and the choice --------------------------------------------------------------------
def format_costs(ops, qtypes: set[int], k: int = 1024, megabytes: int = 64, rounds: int = 7) -> dict[int, float]:  # noqa: ANN001
    """Seconds per weight of one int8-activation row through each format's kernel, streamed from memory
    (`megabytes` of blocks per format, more than the last-level cache); formats interleaved per round and
    the median round kept, since this machine's speed drifts over seconds."""
    x = torch.randn(1, k)
    blocks = {}
    for t in qtypes:
        row = lowbit.row_bytes(t, k)
        # random bytes below 0x3C: every fp16 scale is finite (timing does not depend on the values)
        blocks[t] = [torch.randint(0, 0x3C, (1024, row), dtype=torch.uint8)
                     for _ in range(max(1, megabytes * 2**20 // (1024 * row)))]
    times: dict[int, list[float]] = {t: [] for t in qtypes}
    for _ in range(rounds):
        for t, mats in blocks.items():
            t0 = time.perf_counter()
            for b in mats:
                ops.native_linear(x, [b], [t], None, None, 0.0, 0, None, True)
            times[t].append((time.perf_counter() - t0) / (len(mats) * 1024 * k))
    return {t: sorted(v)[len(v) // 2] for t, v in times.items()}


def choose(sens: dict[str, dict[int, float]], own_cost: dict[str, float], weights: dict[str, int],
           costs: dict[int, float], max_kl: float = MAX_KL) -> MixedPrecision:
    """The cheapest formats whose summed estimate stays <= max_kl: each projection takes argmin
    cost + mu s for the smallest price mu of the estimate that meets it (the Lagrangian relaxation of
    the knapsack, exact on its convex hull)."""
    def option_cost(key: str, t: int) -> float:
        return own_cost[key] if t == KEEP else costs[t] * weights[key]

    def pick(mu: float) -> dict[str, int]:
        return {key: min(s, key=lambda t: (option_cost(key, t) + mu * s[t], s[t])) for key, s in sens.items()}

    def kl(formats: dict[str, int]) -> float:
        return sum(sens[k][t] for k, t in formats.items())

    lo, hi = 0.0, 1.0
    while kl(pick(hi)) > max_kl and hi < 1e30:
        hi *= 4.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if kl(pick(mid)) <= max_kl else (mid, hi)
    formats = pick(hi)
    full = sum(own_cost[k] for k in sens)
    return MixedPrecision(formats, sum(option_cost(k, t) for k, t in formats.items()) / full, kl(formats))


# ---- the draft's weights ------------------------------------------------------------------------
def build(target: ModelWeights, formats: dict[str, int]) -> ModelWeights:
    """The target's projections in `formats` (KEEP: its own blocks), all with int8 activations."""
    return target.map_projections(lambda key, p: requantize(p, formats.get(key, KEEP)))


def requantize(p: Proj, qtype: int) -> Proj:
    """`p` in `qtype`, or as it is (KEEP), read with int8 activations."""
    return with_act8(p) if qtype == KEEP else reencode(p, qtype)
