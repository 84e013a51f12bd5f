"""The sampler: filters equal the sort-based definition, coupled samples follow the filtered softmax,
and the coupled noise depends only on (seed, position, token)."""
from __future__ import annotations

import math

import pytest
import torch

from casspec.config import SamplingConfig
from casspec.errors import InvalidRequestError
from casspec.runtime import kernels
from casspec.verify.coupling import coupled_choice, coupled_tokens, noise_keys
from casspec.verify.sampling import K_PREFIX, candidates, logits_to_probs, rank


def _reference_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Textbook filters in float64 with a full sort: temperature, top-k, top-p, min-p."""
    z = logits.double() / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(z, min(cfg.top_k, z.shape[-1]), -1).values[..., -1:]
        z = z.masked_fill(z < kth, -math.inf)
    p = torch.softmax(z, -1)
    if cfg.top_p < 1:
        sp, order = torch.sort(p, -1, descending=True)
        sp = sp.masked_fill(sp.cumsum(-1) - sp >= cfg.top_p, 0.0)
        p = torch.zeros_like(p).scatter_(-1, order, sp)
    if cfg.min_p:
        p = p.masked_fill(p < cfg.min_p * p.max(-1, keepdim=True).values, 0.0)
    return p / p.sum(-1, keepdim=True)


def _logits(v: int, scale: float, rows: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, v, generator=g) * scale


CONFIGS = [
    SamplingConfig(temperature=0.7),
    SamplingConfig(temperature=1.0, top_p=0.9),
    SamplingConfig(temperature=1.5, top_k=40),
    SamplingConfig(temperature=0.5, top_k=100, top_p=0.8),
    SamplingConfig(temperature=1.0, min_p=0.05),
    SamplingConfig(temperature=2.0, top_p=0.95, min_p=0.01),
]


@pytest.mark.parametrize("cfg", CONFIGS + [SamplingConfig(temperature=3.0, top_p=0.99)])
@pytest.mark.parametrize("v,scale", [(50, 2.0), (300, 3.0), (5000, 1.0), (20000, 2.0)])
def test_filters_equal_the_sort_based_definition(cfg, v, scale):
    """Partial selection (topk prefix, widened for a big nucleus) keeps exactly the textbook survivors."""
    logits = _logits(v, scale, rows=4)
    got = logits_to_probs(logits, cfg).double()
    want = _reference_probs(logits, cfg)
    assert torch.equal(got > 0, want > 0)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("v,k", [(70000, 64), (20000, 64), (20032, 300), (49152, 1024)])
def test_block_ranking_equals_topk(v, k):
    """Integer logits (many ties): the block-max prefilter finds the same top values as a full topk."""
    x = torch.randint(-50, 50, (3, v), generator=torch.Generator().manual_seed(v)).float()
    vals, cols = rank(x, k)
    assert torch.equal(vals, torch.topk(x, k).values)
    assert torch.equal(x.gather(1, cols), vals) and all(len(set(r)) == k for r in cols.tolist())


def _coupled_counts(logits: torch.Tensor, cfg: SamplingConfig, n: int, seed: int = 1) -> torch.Tensor:
    """Counts of n coupled samples of one row: positions 0..n-1 under one seed are independent draws."""
    counts = torch.zeros(logits.shape[-1], dtype=torch.float64)
    for start in range(0, n, 4000):
        m = min(4000, n - start)
        tokens = coupled_tokens(logits.expand(m, -1), SamplingConfig(**{**cfg.__dict__, "seed": seed}),
                                list(range(start, start + m)))
        counts += torch.bincount(torch.tensor(tokens), minlength=len(counts)).double()
    return counts


def _chi_square(counts: torch.Tensor, p: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic over bins of expected count >= 5 (the small ones pooled) and its degrees of freedom."""
    n = float(counts.sum())
    big = p * n >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([p[big] * n, (p[~big].sum() * n)[None]])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    return stat, int(keep.sum()) - 1


def _passes(stat: float, df: int) -> bool:
    return stat < df + 6 * math.sqrt(2 * df)  # far tail of chi-square(df): a wrong sampler lands way above


@pytest.mark.parametrize("cfg", CONFIGS)
def test_coupled_samples_follow_the_filtered_softmax(cfg):
    logits = _logits(300, 1.0)
    want = _reference_probs(logits, cfg)[0]
    counts = _coupled_counts(logits, cfg, 40000)
    assert counts[want == 0].sum() == 0  # never a filtered-out token
    stat, df = _chi_square(counts, want)
    assert df >= 5 and _passes(stat, df), (stat, df)
    hotter = _reference_probs(logits, SamplingConfig(**{**cfg.__dict__, "temperature": cfg.temperature * 1.15}))[0]
    assert not _passes(*_chi_square(counts, hotter))  # the test can tell a wrong temperature


def test_coupled_samples_past_the_ranked_prefix_are_exact():
    """A flat row at high temperature: most samples come from the aggregate of tokens past the ranked prefix."""
    cfg = SamplingConfig(temperature=2.0)
    logits = _logits(5000, 1.0)
    want = _reference_probs(logits, cfg)[0]
    assert float(torch.topk(want, K_PREFIX).values.sum()) < 0.2
    counts = _coupled_counts(logits, cfg, 30000)
    order = torch.argsort(want, descending=True)  # bins: ranked tokens one by one, then 40 groups by rank
    groups = [order[:K_PREFIX]] + list(torch.tensor_split(order[K_PREFIX:], 40))
    got = torch.cat([counts[order[:K_PREFIX]]] + [counts[g].sum()[None] for g in groups[1:]])
    p = torch.cat([want[order[:K_PREFIX]]] + [want[g].sum()[None] for g in groups[1:]])
    assert _passes(*_chi_square(got, p)), _chi_square(got, p)


def test_coupled_token_depends_only_on_seed_position_and_logits():
    """The batch, the row order and the other rows change nothing; seeds and positions do."""
    cfg = SamplingConfig(temperature=1.0, top_p=0.95, seed=11)
    logits = _logits(300, 2.0, rows=6, seed=3)
    positions = [5, 9, 9, 40, 41, 7]
    together = coupled_tokens(logits, cfg, positions)
    alone = [coupled_tokens(logits[i:i + 1], cfg, [t])[0] for i, t in enumerate(positions)]
    flipped = coupled_tokens(logits.flip(0), cfg, positions[::-1])[::-1]
    assert together == alone == flipped
    assert len({coupled_tokens(logits[:1], SamplingConfig(temperature=1.0, seed=s), [5])[0] for s in range(20)}) > 3


def test_pruned_vocabulary_shares_the_noise_of_its_tokens():
    """A draft over a subset of columns holding every survivor draws the same token as the full row."""
    cfg = SamplingConfig(temperature=0.8, top_k=10, seed=4)
    logits = _logits(300, 2.0, rows=20, seed=5)
    for row, t in zip(logits, range(20)):
        keep = torch.cat([torch.topk(row, 10).indices, torch.randperm(300)[:30]]).unique()
        ids = keep[torch.randperm(len(keep))]
        assert coupled_tokens(row[ids][None], cfg, [t], token_ids=ids) == coupled_tokens(row[None], cfg, [t])


@pytest.mark.parametrize("kw", [dict(min_p=-0.1), dict(min_p=1.5), dict(min_p=float("nan")), dict(rule="nope"),
                                dict(top_p=0.0), dict(temperature=-1.0), dict(seed=1.5)])
def test_bad_sampling_settings_are_refused(kw):
    with pytest.raises(InvalidRequestError):
        SamplingConfig(**{"temperature": 1.0, **kw})


@pytest.mark.skipif(not kernels.available(), reason="needs casspec's CPU kernels (x86-64 AVX2)")
@pytest.mark.parametrize("v", [96, 1000, 49152])
@pytest.mark.parametrize("cfg", [SamplingConfig(temperature=0.7, top_p=0.95, seed=1),
                                 SamplingConfig(temperature=1.3, top_p=0.9, seed=2),
                                 SamplingConfig(temperature=0.7, top_k=50, top_p=0.9, seed=3),
                                 SamplingConfig(temperature=0.8, top_k=20, seed=4),
                                 SamplingConfig(temperature=0.8, top_p=0.99, min_p=0.05, seed=5),
                                 SamplingConfig(temperature=3.0, top_p=0.999, seed=6),
                                 SamplingConfig(temperature=0.7, seed=7), SamplingConfig(temperature=2.5, seed=8),
                                 SamplingConfig(temperature=1.5, min_p=0.001, seed=9),
                                 SamplingConfig(temperature=1.0, min_p=0.2, seed=10)], ids=lambda c: c.filters)
def test_the_kernel_sampler_is_the_python_one(cfg, v):
    """kernels/sampling.cpp draws the token coupled_choice(candidates(...)) draws (LM-like rows: a few likely
    tokens over a bulk, so top-p cuts land anywhere from 1 to thousands of columns)."""
    g = torch.Generator().manual_seed(v)
    x = torch.randn(24, v, generator=g) * 2.0
    x[:, :50] += torch.linspace(16, 8, 50) * torch.rand(24, 1, generator=g)
    x = x[:, torch.randperm(v, generator=g)].contiguous()
    keys = noise_keys(cfg.seed, list(range(7, 31)))
    c = candidates(x, cfg)
    ids = torch.randperm(v, generator=g)  # a pruned draft's columns name other token ids: the noise follows them
    for token_ids in (None, ids):
        want = coupled_choice(c, keys, token_ids, 3)  # the sample and two runner-ups
        got, probs = kernels.module().coupled_sample(x, keys, cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p,
                                                     token_ids, 3, True)
        assert torch.equal(got, want)
        torch.testing.assert_close(probs, c.probs_of(want), rtol=1e-5, atol=1e-7)
        alone, _ = kernels.module().coupled_sample(x, keys, cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p,
                                                   token_ids, 1, False)  # the draw without its probabilities
        assert torch.equal(alone[:, 0], want[:, 0])


@pytest.mark.skipif(not kernels.available(), reason="needs casspec's CPU kernels (x86-64 AVX2)")
@pytest.mark.parametrize("v", [1000, 49152])
def test_the_kernel_draws_past_an_open_rows_ranked_prefix_as_python_does(v):
    """Flat rows at a high temperature: the aggregate of the columns past the ranked prefix often wins, and the
    kernel draws inside it the column the Python path draws."""
    cfg = SamplingConfig(temperature=2.0, seed=3)
    x = _logits(v, 1.0, rows=40, seed=v)
    keys = noise_keys(cfg.seed, list(range(40)))
    c = candidates(x, cfg)
    want = coupled_choice(c, keys, None, 2)
    got, _ = kernels.module().coupled_sample(x, keys, cfg.temperature, 0, 1.0, 0.0, None, 2, True)
    assert torch.equal(got, want)
    assert sum(int(col) not in set(ranked.tolist()) for col, ranked in zip(want[:, 0], c.cols)) >= 10


@pytest.mark.skipif(not kernels.available(), reason="needs casspec's CPU kernels (x86-64 AVX2)")
def test_rows_the_kernel_sampler_refuses_go_the_python_way():
    cfg = SamplingConfig(temperature=0.7, top_p=0.9, seed=1)
    x = _logits(300, 1.0, rows=3, seed=2)
    x[1, 7] = float("nan")
    cols, _ = kernels.module().coupled_sample(x.contiguous(), noise_keys(1, [0, 1, 2]), 0.7, 0, 0.9, 0.0, None, 1, True)
    assert int(cols[1, 0]) == -1 and bool((cols[[0, 2], 0] >= 0).all())
    assert coupled_tokens(x, cfg, [0, 1, 2]) == coupled_choice(candidates(x, cfg), noise_keys(1, [0, 1, 2]))[:, 0].tolist()
    with pytest.raises(RuntimeError, match="invalid filters"):
        kernels.module().coupled_sample(x.contiguous(), noise_keys(1, [0, 1, 2]), 0.7, 0, 1.5, 0.0, None, 1, True)
