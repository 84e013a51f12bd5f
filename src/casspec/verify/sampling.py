"""logits -> filtered candidates, probabilities and samples, shared by plain and speculative decoding.

One sampled position costs a partial selection and at most one pass of exp over the vocabulary, never a
sort: `candidates` applies temperature, top-k, top-p and min-p (in that order; see SamplingConfig) to a
batch of rows at once.
- It ranks only the best K_PREFIX columns of each row (`rank`: a block-max prefilter, then topk over the
  few blocks that can hold them), on the raw logits (dividing by T > 0 keeps the order); only the ranked
  values are tempered.
- top-k narrows that prefix to k. top-p needs the row's normaliser (one logsumexp pass; over the k
  survivors when top-k is set) and is computed inside the prefix once the prefix provably holds the
  nucleus (its mass reaches top_p), else the prefix of that row widens NUCLEUS_WIDEN times. min-p is a threshold
  on the best tempered logit.
- Only a row with no top-k / top-p cut can have survivors past the prefix (temperature alone, or a
  permissive min-p): that row is "open", and its survivors past the prefix are every other column whose
  tempered logit is >= its floor. The coupled sampler (verify/coupling.py) takes them as one aggregate and
  looks at them only when the aggregate could win; `logits_to_probs` (the rejection rule's dense
  distribution) gives them their softmax share with one masked softmax.

Exactness: the survivors are the ones the textbook sort-and-cumsum definition gives; ties between equal
logits at a top-k / top-p boundary are broken by topk's order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from casspec.config import SamplingConfig
from casspec.errors import NonFiniteLogitsError
from casspec.runtime import kernels

K_PREFIX = 64  # columns ranked individually per row
WIDEN = 16  # growth factor of coupled sampling's ranked blocks past an open row's prefix (coupling.py)
NUCLEUS_WIDEN = 4  # growth factor of the ranked prefix while top-p's nucleus is not inside it (x4: ranking 256
# of Gemma's 262k columns takes 0.08 ms, 1024 0.42 ms; the nucleus at T = 0.7, top_p = 0.95 is mostly < 256)
BLOCK = 64  # columns per block of the block-max prefilter in `rank`


def rank(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(x, k) of rows x [N, V], faster for k << V: the k best values lie in the k blocks of BLOCK
    columns with the best maxima (ties included), so one cheap max pass narrows topk to k * BLOCK columns."""
    n, v = x.shape
    blocks = v // BLOCK
    if k * BLOCK * 4 > v:
        return torch.topk(x, k, dim=-1)
    best = torch.topk(x[:, :blocks * BLOCK].reshape(n, blocks, BLOCK).amax(-1), k, dim=-1).indices  # [N, k]
    cols = (best[:, :, None] * BLOCK + torch.arange(BLOCK, device=x.device)).reshape(n, k * BLOCK)
    if blocks * BLOCK < v:  # the columns past the last whole block take part as they are
        cols = torch.cat([cols, torch.arange(blocks * BLOCK, v, device=x.device).expand(n, -1)], 1)
    vals, idx = torch.topk(x.gather(1, cols), k, dim=-1)
    return vals, cols.gather(1, idx)


NON_FINITE = "the model produced non-finite logits (NaN or inf) for this request"


def check_finite(values: torch.Tensor) -> None:
    """NonFiniteLogitsError unless every value (a row's max, or its chosen logit) is finite."""
    if not torch.isfinite(values).all():
        raise NonFiniteLogitsError(NON_FINITE)


def _in_kernels(logits: torch.Tensor) -> bool:
    """Whether the CPU kernels (kernels/sampling.cpp) take these logits."""
    return logits.device.type == "cpu" and logits.dtype == torch.float32 and kernels.available()


def greedy_tokens(logits: torch.Tensor) -> list[int]:
    """Each row's argmax of logits [N, V] (its max's first column); NonFiniteLogitsError where a row's max is NaN
    or inf or no value is finite. On the CPU one kernel call, else `first_argmax`."""
    if _in_kernels(logits):
        best = kernels.module().first_argmax(logits.contiguous()).tolist()  # -1: the row's max is not finite
        if min(best) < 0:
            raise NonFiniteLogitsError(NON_FINITE)
        return best
    top = first_argmax(logits)  # [N]; argmax picks a row's NaN or +inf, and lands on -inf only when all are
    check_finite(logits.gather(1, top[:, None]))
    return top.tolist()


def top_probs(logits: torch.Tensor, k: int) -> list[tuple[list[int], list[float]]]:
    """Each row's k most likely columns of logits [N, V] with their softmax probabilities, best first (column 0
    is argmax's; a row whose max is not finite: none). On the CPU one kernel call (kernels/sampling.cpp)."""
    if _in_kernels(logits):
        cols, probs = kernels.module().top_softmax(logits.contiguous(), k)
        return [([j for j in c if j >= 0], p[:sum(j >= 0 for j in c)]) for c, p in zip(cols.tolist(), probs.tolist())]
    probs = torch.softmax(logits.float(), dim=-1)  # [N, V]
    top = torch.topk(probs, min(k, probs.shape[-1]))
    out = []
    for p, j, tv, ti in zip(probs, probs.argmax(-1).tolist(), top.values.tolist(), top.indices.tolist()):
        runner = [(v, i) for v, i in zip(tv, ti) if i != j][:k - 1]
        out.append(([j] + [i for _, i in runner], [float(p[j])] + [v for v, _ in runner]))
    return out


def first_argmax(x: torch.Tensor) -> torch.Tensor:
    """torch.argmax(x, -1) of rows x [N, V] (the first index of each row's max, NaN counting as the max), by the
    block maxima `rank` prefilters with: the first block holding the max holds its first occurrence. torch's
    argmax reads a 262k row in 0.14 ms on this CPU, amax ~15x faster; this takes 0.026 ms."""
    n, v = x.shape
    if v % BLOCK or v < 8 * BLOCK:
        return x.argmax(-1)
    blocks = x.reshape(n, v // BLOCK, BLOCK)  # [N, B, BLOCK]
    b = blocks.amax(-1).argmax(-1)  # [N] the first block holding the max
    inner = blocks[torch.arange(n), b].argmax(-1)  # [N]
    return b * BLOCK + inner


@dataclass
class Candidates:
    """The columns of each row that survive the filters, best first (one row per sampled position)."""

    x: torch.Tensor  # [N, V] raw logits
    temperature: float
    logits: torch.Tensor  # [N, K] tempered logits of the ranked survivors, best first; -inf past a row's last
    cols: torch.Tensor  # [N, K] their columns
    floor: torch.Tensor  # [N] min-p threshold on tempered logits (-inf: none)
    open: torch.Tensor  # [N] bool: survivors go on past the K ranked columns (every column with z >= floor)

    def z(self, rows: torch.Tensor) -> torch.Tensor:
        """Tempered logits [len(rows), V] of some rows, non-survivors of an open row at -inf."""
        z = self.x[rows].float() / self.temperature
        floor = self.floor[rows, None]
        return z.masked_fill_(z < floor, -math.inf) if bool((floor > -math.inf).any()) else z

    def log_norm(self) -> torch.Tensor:
        """[N] log of the survivors' total unnormalised mass: probability = exp(z - log_norm)."""
        out = torch.logsumexp(self.logits, -1)
        rows = self.open.nonzero()[:, 0]
        if len(rows):
            out[rows] = torch.logsumexp(self.z(rows), -1)
        return out

    def probs_of(self, cols: torch.Tensor) -> torch.Tensor:
        """Filtered probabilities [N, C] of columns cols [N, C] (-1 reads as probability 0)."""
        z = self.x.gather(1, cols.clamp(min=0)).float() / self.temperature
        return torch.exp(z - self.log_norm()[:, None]).masked_fill_(cols < 0, 0.0)


def candidates(logits: torch.Tensor, cfg: SamplingConfig) -> Candidates:
    """Temperature, top-k, top-p and min-p applied to logits [N, V] (see the module docstring)."""
    x = logits.float()
    t = max(cfg.temperature, 1e-5)
    n, v = x.shape
    k = min(cfg.top_k, v) if cfg.top_k > 0 else 0
    vals, cols = rank(x, k or min(K_PREFIX, v))  # [N, width], best first
    vals = vals / t
    keep = torch.ones_like(vals, dtype=torch.bool)
    closed = k > 0 or vals.shape[1] == v  # the prefix holds every survivor
    if cfg.top_p < 1.0:  # the nucleus is a share of the top-k survivors' mass, or of the whole row's
        lse = torch.logsumexp(vals, -1, keepdim=True) if k else _logsumexp(x, t)  # [N, 1]
        vals, cols, keep = _nucleus(x, t, vals, cols, lse, cfg.top_p, closed)
        closed = True
    floor = torch.full((n,), -math.inf, device=x.device)
    if cfg.min_p > 0:
        floor = vals[:, 0] + math.log(cfg.min_p)
        keep &= vals >= floor[:, None]
    is_open = keep[:, -1] if not closed else torch.zeros(n, dtype=torch.bool, device=x.device)
    last = int(keep.sum(1).max())  # survivors are a prefix of each row: drop columns no row keeps
    return Candidates(x, t, vals[:, :last].masked_fill(~keep[:, :last], -math.inf), cols[:, :last], floor, is_open)


def _logsumexp(x: torch.Tensor, t: float) -> torch.Tensor:
    """logsumexp(x / t) over rows [N, V] -> [N, 1], with one temporary."""
    m = x.amax(-1, keepdim=True)
    e = torch.sub(x, m).mul_(1.0 / t).exp_()
    return m / t + e.sum(-1, keepdim=True).log_()


def _nucleus(x: torch.Tensor, t: float, vals: torch.Tensor, cols: torch.Tensor, lse: torch.Tensor, top_p: float,
             closed: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-p inside ranked prefixes vals/cols [N, W] (tempered values) of rows x [N, V] with log-normalisers
    lse [N, 1]: the smallest prefix with mass >= top_p. A row whose prefix holds less mass (and is not the
    whole row, `closed`) is ranked again NUCLEUS_WIDEN times wider. Returns vals, cols, keep [N, W'] (rows padded with
    -inf and their top column)."""
    p = torch.exp(vals.double() - lse.double())
    cum = p.cumsum(-1)
    keep = cum - p < top_p
    short: torch.Tensor | list[int] = (cum[:, -1] < top_p).nonzero()[:, 0] if not closed else []
    if len(short) == 0:
        return vals, cols, keep
    width = min(x.shape[1], vals.shape[1] * NUCLEUS_WIDEN)
    xs = x[short]
    v2, c2 = rank(xs, width)
    v2, c2, k2 = _nucleus(xs, t, v2 / t, c2, lse[short], top_p, width == x.shape[1])
    pad = v2.shape[1] - vals.shape[1]
    vals = torch.cat([vals, vals.new_full((len(vals), pad), -math.inf)], 1)
    cols = torch.cat([cols, cols[:, :1].expand(-1, pad)], 1)
    keep = torch.cat([keep, keep.new_zeros(len(keep), pad)], 1)
    vals[short], cols[short], keep[short] = v2, c2, k2
    return vals, cols, keep


def logits_to_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """The filtered distribution of logits [..., V] as dense probabilities [..., V]."""
    shape = logits.shape
    c = candidates(logits.reshape(-1, shape[-1]), cfg)
    probs = torch.zeros_like(c.x).scatter_add_(1, c.cols, torch.softmax(c.logits, -1))  # padding adds 0
    rows = c.open.nonzero()[:, 0]
    if len(rows):
        probs[rows] = torch.softmax(c.z(rows), -1)
    return probs.reshape(shape)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """Draw one token id from probs [V] (unnormalised is fine): inverse CDF with one uniform, one pass.
    (torch.multinomial draws V exponentials: ~4 ms on a 262k vocabulary.) The cumsum accumulates in
    double on the CPU, so each token's probability is exact to float32 rounding."""
    if generator is not None and probs.device != generator.device:
        probs = probs.to(generator.device)  # the seeded stream lives on the CPU on every device
    cdf = probs.float().cumsum(-1)
    u = torch.rand((), generator=generator, dtype=torch.float64) * float(cdf[-1])
    i = int(torch.searchsorted(cdf, u.float()[None], right=True))
    return i if i < len(cdf) and probs[i] > 0 else int((probs > 0).nonzero()[-1])


def uniform(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator))
