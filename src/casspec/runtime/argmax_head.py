"""The target's greedy token without its full-precision head: int8-activation logits, a bound, a few exact rows.

Greedy decoding and greedy verification read one thing from the head: the first argmax of each row. For a
Q8_0 head (SmolLM2's and Gemma-3's, 21% and 73% of their bytes) the activation-quantized head (the `a8`
draft's integer dot products) reads the same bytes with fewer instructions (Gemma: 5.8 against 7.8 ms at
one row on an AVX2 CPU), and how far its logits can be from the target's is known exactly. With x the
normalized row, x^ its int8 quantization per block b of 32 (scale d_b = max|x_b| / 127, so |x_i - x^_i| <=
d_b / 2) and w_v the head row of token v:

    |l_v - l^_v| <= sum_b A[v, b] d_b / 2  +  rounding,    A[v, b] = sum_{i in b} |w_vi|

(rounding: each side's fp32 decoding and accumulation is off by at most ~K 2^-24 sum_i |w_vi x_i|, and
sum_i |w_vi x_i| <= S_v max|x| with S_v = sum_i |w_vi|, so `rounding_factor(K)` S_v max|x| covers both: 2.5 K 2^-24,
at least 1e-4). Every token whose exact logit could be the row's maximum has l^_v + B_v >= max_u (l^_u - B_u);
those candidates (a handful: Gemma median 12, at most a few hundred over Spec-Bench rows) are recomputed with
the target's own fp32 kernel, bitwise the values the full head computes for them. The returned logits are
those values at the candidates and -inf elsewhere, so a first argmax over them is the full head's, ties
included. Only greedy rows without logprobs may use this (decoder.verify decides).

The bound groups the K / 32 blocks into GROUPS groups (A summed, d maxed per group): a [GROUPS + 1, V] fp16
table (rounded up), 2.6 MB for Gemma, made once from the head's rows in chunks.

Whether it pays depends on the CPU and the number of rows: on an AVX2-only CPU it ran Gemma's head at 0.75 of
the full head's time at one row; on an AVX-512 Xeon, where the full head's 6-16-row path runs two rows per
512-bit FMA (kernels/native_wide.cpp), 0.92 at one row, 0.82 at two and 1.10-1.24 from six rows on. So the
rows that pay are timed once when it is built (`max_rows`); more rows than that take the full head.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from types import ModuleType

import torch

from casspec.runtime.gguf_file import NativeTensor
from casspec.runtime.weights import Proj, with_act8

Q8_0 = 8  # ggml's type id: a symmetric format (w = d q), whose integer dot products have no offset term
GROUPS = 4  # bound groups of blocks: per block (20 for Gemma) gave ~4 candidates, 4 groups ~18, 1 group ~90
SLACK = 1.01  # on the quantization term: the kernel's scale may differ from ours by rounding
ROUNDING = 1e-4  # the least rounding factor (the bound's term for K <= 640 heads: 2.5 K 2^-24 is 9.5e-5 there)
MAX_SHARE = 1 / 16  # more candidates than this share of the vocabulary: the full head is cheaper
BLOCK_COLS = 64  # kernels/argmax_bound.cpp's COLS
_CHUNK = 16384  # head rows dequantized at a time while the table is built
TIMED_ROWS = (1, 2, 3, 4, 6, 8, 12, 16)  # row counts timed against the full head when built (max_rows)
TIMED_REPEATS = 3  # interleaved rounds; the best of each is compared


class ArgmaxHead:
    """First-argmax-exact logits of a Q8_0 head (the rest -inf) at the cost of its int8-activation pass."""

    def __init__(self, head: Proj, ops: ModuleType, max_rows: int | None = None) -> None:
        """`max_rows`: most input rows that take this head (None: the most that measure faster than the full head
        on this machine, `rows_that_pay`)."""
        assert head.native is not None and len(head.native) == 1, "a single native head"
        self.head, self.a8_head, self.ops = head, with_act8(head), ops  # the same blocks, int8 activations
        self.blocks: NativeTensor = head.native[0]
        self.edges = _edges(head.k)  # group g: columns edges[g] .. edges[g + 1] - 1
        self.table = _bound_table(self.blocks, self.edges)  # [GROUPS + 1, V] fp16, rounded up
        self.block_max = _block_max(self.table)  # [GROUPS + 1, V / 64]
        self.max_rows = self.rows_that_pay() if max_rows is None else max_rows

    @staticmethod
    def supports(head: Proj) -> bool:
        """A single Q8_0 block tensor with whole blocks (what the bound above is derived for)."""
        return (head.native is not None and len(head.native) == 1 and head.native[0].qtype == Q8_0
                and head.bias is None and head.k // 32 >= GROUPS)

    def logits(self, h: torch.Tensor, norm: torch.Tensor, eps: float,
               softcap: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:  # [M, V] fp32
        """Logits of rows h [M, K] (before the final norm) exact where they may be a row's maximum, else -inf;
        the full head's when the candidates are too many, or the rows more than `max_rows`."""
        if h.shape[0] > self.max_rows:
            return softcap(self._full(h, norm, eps))
        return self._bounded(h, norm, eps, softcap)

    def _bounded(self, h: torch.Tensor, norm: torch.Tensor, eps: float,
                 softcap: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:  # [M, V] fp32
        """`logits` through the bound, whatever the number of rows."""
        l_hat = self.ops.native_linear(h, self.a8_head.blocks, self.a8_head.qtypes, None, norm, eps, 0, None,
                                       1)  # [M, V]
        ids = self.ops.bound_candidates(h, norm, eps, l_hat, self.table, self.block_max, self.edges, SLACK,
                                        rounding_factor(h.shape[1]))  # [C] sorted
        if not 0 < ids.numel() <= MAX_SHARE * l_hat.shape[1]:  # none: a row is not finite
            return softcap(self._full(h, norm, eps))
        rows = self.blocks.rows(ids)
        exact = self.ops.native_linear(h, [rows.blocks], [rows.qtype], None, norm, eps, 0, None, 0)  # [M, C]
        out = torch.full_like(l_hat, float("-inf"))
        out[:, ids] = softcap(exact)
        return out

    def _full(self, h: torch.Tensor, norm: torch.Tensor, eps: float) -> torch.Tensor:
        return self.ops.native_linear(h, self.head.blocks, self.head.qtypes, None, norm, eps, 0, None, 0)

    def rows_that_pay(self) -> int:
        """The most input rows (of TIMED_ROWS) up to which this head measured faster than the full head at every
        size, 0 if none: both timed side by side in rounds, on head rows as hidden states (each row's logits
        then peak at its own token, as a model's do, so the candidates are as few as in decoding)."""
        k, n_vocab = self.head.k, self.blocks.shape[0]
        norm, identity = torch.ones(k), (lambda t: t)
        best: dict[tuple[int, bool], float] = {}
        for _ in range(TIMED_REPEATS):
            for m in TIMED_ROWS:
                h = self.blocks.dequantize(torch.randint(0, n_vocab, (m,))) * 8.0  # [m, K]
                for bounded in (False, True):
                    t0 = time.perf_counter()
                    self._bounded(h, norm, 1e-6, identity) if bounded else self._full(h, norm, 1e-6)
                    seconds = time.perf_counter() - t0
                    best[m, bounded] = min(best.get((m, bounded), seconds), seconds)
        pays = 0
        for m in TIMED_ROWS:
            if best[m, True] > best[m, False]:
                break
            pays = m
        return pays


def rounding_factor(k: int) -> float:
    """The bound's rounding term over S_v max|x| for rows of k values: fp32 decoding and accumulation of the target
    and of the estimate, each within k 2^-24 of its sum of |products| (a sequential sum's worst case), plus margin."""
    return max(ROUNDING, 2.5 * k * 2.0 ** -24)


def _edges(k: int) -> list[int]:
    """Column edges of GROUPS runs of whole blocks of 32 (the bound's d is a block's: groups never split one)."""
    nb = k // 32
    return [32 * (g * nb // GROUPS) for g in range(GROUPS + 1)]


def _bound_table(head: NativeTensor, edges: list[int]) -> torch.Tensor:  # [GROUPS + 1, V]
    """Per token: sum |w| over each group of blocks, and over the whole row (the rounding term's S_v)."""
    v, k = head.shape
    groups = [slice(a, b) for a, b in zip(edges, edges[1:])]
    out = torch.empty(GROUPS + 1, v)
    for s in range(0, v, _CHUNK):
        ids = torch.arange(s, min(v, s + _CHUNK))
        w = head.dequantize(ids).abs()  # [n, K]
        per_group = torch.stack([w[:, g].sum(dim=1) for g in groups], dim=1)  # [n, G]
        out[:GROUPS, s:s + len(ids)] = per_group.T
        out[GROUPS, s:s + len(ids)] = per_group.sum(dim=1)
    return _round_up_half(out)


def _block_max(table: torch.Tensor) -> torch.Tensor:  # [G + 1, ceil(V / BLOCK_COLS)] fp32
    """Each table row's maximum over blocks of BLOCK_COLS columns (kernels/argmax_bound.cpp skips blocks by it)."""
    g1, v = table.shape
    pad = -v % BLOCK_COLS
    padded = torch.cat([table.float(), table.new_zeros(g1, pad, dtype=torch.float32)], dim=1)
    return padded.view(g1, -1, BLOCK_COLS).amax(dim=2).contiguous()


def _round_up_half(t: torch.Tensor) -> torch.Tensor:
    """fp16 no smaller than `t` (>= 0) anywhere: the kernel reads half the bytes and B stays an upper bound."""
    h = t.half()
    bits = h.view(torch.int16)  # for finite h >= 0 the next larger fp16 is the next bit pattern
    bits[h.float() < t] += 1
    return h
