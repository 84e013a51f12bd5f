"""Seed-stable coupled sampling: Gumbel-max with noise fixed by (seed, position, token).

The token at position t (its index in the committed sequence, prompt included) is

    x_t = argmax_i  z_i + g(seed, t, i)        over the survivors i of the filters (sampling.candidates)

with z the tempered logits and g(seed, t, i) = -log(-log u), u a uniform in (0, 1) from a counter-based hash
(splitmix64) of (seed, t, i). For independent Gumbel noise this is an exact sample of softmax(z) over the
survivors (the Gumbel-max trick, equivalently the exponential race argmax p_i / E_i). Position t's noise is
independent of every other position's, so a whole sequence is an exact sample of the filtered target.

The noise depends on nothing but (seed, t, i), so x_t depends only on the seed and the target's logits at t:
not on the draft tree, the batch, the timing or the method. Verification is then an equality test (a draft
token is kept when it equals x_t), and every method's output for a seed is token-identical to `ar`'s. Drafts
use the same noise over their own logits, so a draft close to the target proposes the same x_t.

Cost is proportional to the ranked survivors (sampling.K_PREFIX per row), not to the vocabulary. An open row
(no top-k / top-p cut) also has survivors past the ranked prefix: they enter as one aggregate whose location
is their logsumexp L and whose noise is g(seed, t, -1) (the max of independent Gumbels located at z_i is a
Gumbel located at logsumexp z_i, so this is exact). L is computed only when the bound
log(#rest) + max(z in the rest) + g(-1) could beat the best ranked score, so a peaked row never pays a pass
over the vocabulary. When the aggregate wins, the token is drawn inside it the same way, one wider ranked
block at a time, with the next aggregates' noise ids -2, -3, ...; the noise used inside a won aggregate is
disjoint from, hence independent of, the noise that decided it.
"""
from __future__ import annotations

import math

import torch

from casspec.config import SamplingConfig
from casspec.runtime import kernels
from casspec.verify.sampling import WIDEN, Candidates, candidates, check_finite, rank

_M64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15  # splitmix64 increment (odd: id -> id * GAMMA is a bijection mod 2^64)
_C1, _C2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _signed(x: int) -> int:
    return x - (1 << 64) if x >> 63 else x


def _mix64(x: int) -> int:
    """splitmix64's finaliser on a Python int in [0, 2^64)."""
    x = ((x ^ (x >> 30)) * _C1) & _M64
    x = ((x ^ (x >> 27)) * _C2) & _M64
    return x ^ (x >> 31)


def noise_key(seed: int, position: int) -> int:
    """The 64-bit key of position `position`'s noise under `seed` (as a signed int64)."""
    return _signed(_mix64((_mix64((seed + _GAMMA) & _M64) + position * _GAMMA) & _M64))


def noise_keys(seed: int | None, positions: list[int]) -> torch.Tensor:
    """[N] int64 keys, one per sampled position (seed None reads as 0)."""
    s = 0 if seed is None else seed
    return torch.tensor([noise_key(s, t) for t in positions], dtype=torch.int64)


def _srl(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def gumbel(keys: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise [N, K] float64 for token ids [N, K] (any int64; negatives name aggregates)
    under keys [N]: splitmix64 output number id + 1 of the stream that starts at the key."""
    x = (ids.to(torch.int64) + 1) * _signed(_GAMMA)  # int64 arithmetic wraps mod 2^64
    x += keys.to(x.device)[:, None]
    x ^= _srl(x, 30)
    x *= _signed(_C1)
    x ^= _srl(x, 27)
    x *= _signed(_C2)
    x ^= _srl(x, 31)
    u = _srl(x, 11).double().add_(0.5).mul_(2.0 ** -53)  # (0, 1), 53 random bits
    return u.log_().neg_().log_().neg_()


def coupled_choice(c: Candidates, keys: torch.Tensor, token_ids: torch.Tensor | None = None,
                   top: int = 1) -> torch.Tensor:
    """Columns [N, top] ranked by perturbed score z + g; column 0 is the sample, the rest runner-ups (-1: none).

    keys: [N] noise keys (noise_keys); token_ids: [V] token id per column when the rows are a pruned
    vocabulary (the noise is keyed by token id, so a pruned draft and the target share it).
    """
    n, v = c.x.shape
    ids = c.cols if token_ids is None else token_ids[c.cols]
    has_rest = c.cols.shape[1] < v and bool(c.open.any())
    if has_rest:  # the first aggregate's noise (id -1) in the same call
        ids = torch.cat([ids, ids.new_full((n, 1), -1)], 1)
    noise = gumbel(keys, ids)  # [N, K (+1)]
    score = c.logits.double() + noise[:, :c.cols.shape[1]]
    best, idx = torch.topk(score, min(top, score.shape[1]), dim=-1)
    out = c.cols.gather(1, idx).masked_fill(best == -math.inf, -1)
    if top > out.shape[1]:
        out = torch.cat([out, out.new_full((n, top - out.shape[1]), -1)], 1)
    if not has_rest:
        return out
    # open rows: the aggregate of the survivors past the ranked prefix could win only when this upper
    # bound of its score (log #rest + best logit in the rest + its noise) beats the best ranked score
    g_rest = noise[:, -1]
    bound = math.log(v - c.cols.shape[1]) + c.logits[:, -1].double() + g_rest
    rows = (c.open & (bound > best[:, 0])).nonzero()[:, 0]
    if len(rows):
        z = c.z(rows).scatter_(1, c.cols[rows], -math.inf)  # the open rows' survivors past the ranked prefix
        for r, zr in zip(rows.tolist(), z):
            token = _draw_aggregate(zr, int(keys[r]), token_ids, float(best[r, 0]), c.cols.shape[1], float(g_rest[r]))
            if token is not None:
                out[r] = torch.cat([out.new_tensor([token]), out[r, :-1]])
    return out


def coupled_tokens(logits: torch.Tensor, cfg: SamplingConfig, positions: list[int],
                   token_ids: torch.Tensor | None = None, strict: bool = False) -> list[int]:
    """The coupled sample of each row of logits [N, V] at its position (token ids when `token_ids` maps columns).
    `strict`: a row with NaN or inf logits, or none finite, raises NonFiniteLogitsError."""
    cols = coupled_draws(logits, cfg, noise_keys(cfg.seed, positions), token_ids, probs=False, strict=strict)[0][:, 0]
    return (cols if token_ids is None else token_ids[cols]).tolist()


def coupled_draws(logits: torch.Tensor, cfg: SamplingConfig, keys: torch.Tensor, token_ids: torch.Tensor | None = None,
                  top: int = 1, probs: bool = True, strict: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`coupled_choice` over the filtered rows of logits [N, V] -> columns [N, top] (-1: none) and their filtered
    probabilities [N, top] (zeros unless `probs`: an open row's need a pass over its vocabulary). On the CPU
    the kernels compute both in one call (kernels/sampling.cpp, the same function); rows they refuse
    (NaN or inf logits, or none finite: strict raises NonFiniteLogitsError) and other devices go the torch way."""
    if logits.device.type == "cpu" and kernels.available():
        ids = None if token_ids is None else token_ids.to(torch.int64).contiguous()
        cols, p = kernels.module().coupled_sample(logits.float().contiguous(), keys, cfg.temperature, cfg.top_k,
                                                  cfg.top_p, cfg.min_p, ids, top, probs)
        if min(cols[:, 0].tolist()) >= 0:  # (one list, not three small tensor ops: this runs every token)
            return cols, p
        rows = (cols[:, 0] < 0).nonzero()[:, 0]
        if strict:
            check_finite(logits[rows].amax(-1))  # a NaN anywhere in a row makes its max NaN
        c = candidates(logits[rows], cfg)
        cols[rows] = coupled_choice(c, keys[rows], token_ids, top)
        p[rows] = c.probs_of(cols[rows])
        return cols, p
    if strict:
        check_finite(logits.amax(-1))
    c = candidates(logits, cfg)
    cols = coupled_choice(c, keys, token_ids, top)
    return cols, c.probs_of(cols) if probs else torch.zeros(cols.shape)


def _draw_aggregate(z: torch.Tensor, key: int, token_ids: torch.Tensor | None, best: float, ranked: int,
                    noise: float) -> int | None:
    """Survivors z [V] (-inf elsewhere) of one open row outside its ranked prefix of size `ranked`, whose
    best ranked score is `best` and whose aggregate noise is `noise` (id -1): the column drawn if their
    aggregate wins, else None (the ranked winner stands)."""
    keys = torch.tensor([key], dtype=torch.int64)
    winner, level = None, 1
    while True:
        if level > 1:
            noise = float(gumbel(keys, torch.tensor([[-level]]))[0, 0])
        if float(torch.logsumexp(z, 0)) + noise <= best:
            return winner
        # the aggregate wins: rank its next block individually, the remainder is the next aggregate
        vals, cols = rank(z[None], min(len(z), ranked * (WIDEN - 1)))
        vals, cols = vals[0], cols[0]
        alive = vals > -math.inf
        ids = cols if token_ids is None else token_ids[cols]
        score = (vals.double() + gumbel(keys, ids[None])[0]).masked_fill(~alive, -math.inf)
        j = int(score.argmax())
        winner, best = int(cols[j]), float(score[j])
        if not bool(alive.all()) or len(cols) == len(z):
            return winner
        z = z.index_fill(0, cols, -math.inf)
        ranked += len(cols)
        level += 1
