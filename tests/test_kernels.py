"""casspec's CPU kernels compute what the torch backend computes (allclose), batch-invariantly."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from casspec.runtime import kernels
from casspec.runtime.backend import KernelBackend, TorchBackend, rms_norm
from casspec.runtime.weights import make_proj, quantize

pytestmark = pytest.mark.skipif(not kernels.available(), reason="casspec CPU kernels need x86-64 AVX2 and a compiler")
TORCH, KERNELS = TorchBackend(), KernelBackend() if kernels.available() else None


def _close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    torch.testing.assert_close(got, want, rtol=rel, atol=rel * float(want.abs().max()))


@pytest.mark.parametrize("n,k", [(12, 16), (13, 24), (64, 40), (21, 64), (96, 576), (40, 192)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 16, 64])
@pytest.mark.parametrize("kind", ["fp32", "int8", "int4"])
def test_linear_matches_torch(n, k, rows, kind):
    g = torch.Generator().manual_seed(n * rows)
    w, b, nw = torch.randn(n, k, generator=g), torch.randn(n, generator=g), torch.rand(k, generator=g) + 0.5
    p = make_proj([w[: n // 3], w[n // 3:]], [b[: n // 3], b[n // 3:]], tile=True)
    p = quantize(p, kind) if kind != "fp32" else p
    assert p.tiled is not None or k % 8 or (kind == "int4" and k % 32)
    x = torch.randn(rows, k, generator=g)
    _close(KERNELS.linear(x, p, nw, 1e-5), TORCH.linear(x, p, nw, 1e-5))
    h = torch.randn(rows, n, generator=g)
    _close(KERNELS.linear(x, p, out=h.clone()), TORCH.linear(x, p, out=h.clone()))


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_gated_mlp_matches_torch(act, rows):
    g = torch.Generator().manual_seed(rows)
    gate, up, x = torch.randn(10, 64, generator=g), torch.randn(10, 64, generator=g), torch.randn(rows, 64, generator=g)
    p = make_proj([gate, up], glu=act, tile=True)
    want = (F.silu(x @ gate.T) if act == "silu" else F.gelu(x @ gate.T, approximate="tanh")) * (x @ up.T)
    _close(KERNELS.linear(x, p), want)
    for kind in ("int8", "int4"):
        q = quantize(p, kind)
        _close(KERNELS.linear(x, q), TORCH.linear(x, q))


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_gated_activation_saturates_like_torch(act):
    """Gates far into both tails (the vectorized exp clamps its argument) give torch's values, never NaN."""
    gate = torch.eye(12, 64) * torch.linspace(-300.0, 300.0, 12)[:, None]  # gate f = x[f] * (-300 .. 300)
    up, x = torch.ones(12, 64), torch.ones(2, 64)
    p = make_proj([gate, up], glu=act, tile=True)
    pre = x @ gate.T
    want = (F.silu(pre) if act == "silu" else F.gelu(pre, approximate="tanh")) * (x @ up.T)
    got = KERNELS.linear(x, p)
    assert not got.isnan().any()
    _close(got, want)


@pytest.mark.parametrize("kind", ["fp32", "int8", "int4"])
def test_linear_rows_are_batch_invariant(kind):
    """A row's output is bitwise the same computed alone or among others (greedy exactness of chains)."""
    p = make_proj([torch.randn(40, 64)], tile=True)
    p = quantize(p, kind) if kind != "fp32" else p
    x = torch.randn(9, 64)
    batch = KERNELS.linear(x, p)
    for i in range(9):
        assert torch.equal(KERNELS.linear(x[i:i + 1], p)[0], batch[i])


@pytest.mark.parametrize("glu", [None, "silu"])
def test_quantized_weights_round_trip(glu):
    """int8 is within half a step per row, int4 within half a step per group, in logical row order."""
    w = torch.randn(8, 128) * torch.logspace(-2, 2, 8)[:, None]
    p = make_proj([w[:4], w[4:]], glu=glu, tile=True)
    q8, q4 = quantize(p, "int8"), quantize(p, "int4")
    assert q8.tiled.dtype == torch.int8 and q4.tiled.dtype == torch.uint8 and q4.group == 64
    err8 = (torch.cat(q8.weights()) - w).abs()
    assert (err8 <= w.abs().amax(1, keepdim=True) / 254 + 1e-6).all()
    groups = w.reshape(8, 2, 64)
    step = (groups.amax(2) - groups.amin(2)) / 15
    err4 = (torch.cat(q4.weights()) - w).abs().reshape(8, 2, 64)
    assert (err4 <= step[..., None] * 0.51 + 1e-3).all()


@pytest.mark.parametrize("qk_norm", [False, True])
def test_rope_kv_matches_torch(qk_norm):
    g = torch.Generator().manual_seed(1)
    heads, kv_heads, d, m = 4, 2, 16, 3
    qkv = torch.randn(m, (heads + 2 * kv_heads) * d, generator=g)
    cos, sin = torch.randn(m, d // 2, generator=g), torch.randn(m, d // 2, generator=g)
    slots = torch.tensor([5, 2, 9])
    norms = (torch.rand(d, generator=g), torch.rand(d, generator=g)) if qk_norm else (None, None)
    caches = [[torch.zeros(kv_heads, 12, d), torch.zeros(kv_heads, 12, d)] for _ in range(2)]
    q = [be.rope_kv(qkv, cos, sin, *c, slots, heads, kv_heads, *norms, 1e-6) for be, c in zip((KERNELS, TORCH), caches)]
    _close(q[0], q[1])
    for a, b in zip(caches[0], caches[1]):
        _close(a, b)


@pytest.mark.parametrize("d", [16, 64, 256])
@pytest.mark.parametrize("kv_len", [1, 7, 256, 301, 700])
def test_attention_matches_sdpa(d, kv_len):
    g = torch.Generator().manual_seed(kv_len)
    m, heads, kv_heads = 3, 4, 2
    q = torch.randn(m, heads, d, generator=g)
    kc, vc = torch.randn(kv_heads, 720, d, generator=g), torch.randn(kv_heads, 720, d, generator=g)
    allowed = torch.rand(m, kv_len, generator=g) < 0.6
    allowed[:, 0] = True
    lo, lens = torch.zeros(m, dtype=torch.long), torch.full((m,), kv_len)
    for mask in (None, allowed):
        _close(KERNELS.attention(q, kc, vc, lo, lens, mask, d ** -0.5),
               TORCH.attention(q, kc, vc, lo, lens, mask, d ** -0.5), rel=1e-4)


def test_attention_rows_see_only_their_own_key_range():
    """Rows of different sequences (regions) in one call equal each sequence's call alone, bitwise."""
    g = torch.Generator().manual_seed(7)
    kc, vc = torch.randn(2, 900, 64, generator=g), torch.randn(2, 900, 64, generator=g)
    q = torch.randn(5, 4, 64, generator=g)
    lo, lens = torch.tensor([0, 0, 300, 300, 610]), torch.tensor([257, 258, 9, 10, 290])
    allowed = torch.rand(5, 290, generator=g) < 0.8
    allowed[:, 0] = True
    both = KERNELS.attention(q, kc, vc, lo, lens, allowed, 0.125)
    for i in range(5):
        alone = KERNELS.attention(q[i:i + 1].contiguous(), kc, vc, lo[i:i + 1], lens[i:i + 1],
                                  allowed[i:i + 1, :int(lens[i])].contiguous(), 0.125)
        assert torch.equal(alone[0], both[i])
    _close(both, TORCH.attention(q, kc, vc, lo, lens, allowed, 0.125), rel=1e-4)


def test_attention_of_a_chain_equals_decoding_one_token_at_a_time():
    """Causally masked rows see exactly what each token saw when decoded alone (bitwise)."""
    kc, vc = torch.randn(2, 600, 64), torch.randn(2, 600, 64)
    q = torch.randn(6, 4, 64)
    base = 510  # the chain crosses a key-block boundary
    allowed = torch.arange(base + 6)[None, :] <= (base + torch.arange(6))[:, None]
    zero = torch.zeros(1, dtype=torch.long)
    chain = KERNELS.attention(q, kc, vc, zero.repeat(6), torch.full((6,), base + 6), allowed, 0.125)
    for i in range(6):
        alone = KERNELS.attention(q[i:i + 1].contiguous(), kc, vc, zero, torch.tensor([base + i + 1]), None, 0.125)
        assert torch.equal(alone[0], chain[i])


@pytest.mark.skipif(not (kernels.available() and kernels.module().attention_avx512()),
                    reason="needs a CPU with AVX-512 (F, DQ, VL)")
@pytest.mark.parametrize("d", [8, 16, 40, 64, 256])
@pytest.mark.parametrize("group", [1, 2, 3, 4, 5])
def test_avx512_attention_is_bitwise_the_avx2_attention(d, group):
    """The AVX-512 attention (two heads a vector in the scores, 16 columns in p @ V) runs each lane's chain as the
    AVX2 code does: the same bits, with and without a mask, over key blocks and rows of other lengths."""
    g = torch.Generator().manual_seed(d * group)
    ops, kv_heads, m = kernels.module(), 2, 5
    q = torch.randn(m, kv_heads * group, d, generator=g)
    kc, vc = torch.randn(kv_heads, 700, d, generator=g), torch.randn(kv_heads, 700, d, generator=g)
    lo, lens = torch.tensor([0, 0, 3, 100, 400]), torch.tensor([1, 300, 697, 257, 300])
    allowed = torch.rand(m, 697, generator=g) < 0.7
    allowed[:, 0] = True
    try:
        for mask in (None, allowed):
            out = {}
            for on in (False, True):
                ops.attention_avx512(on)
                out[on] = ops.attention(q, kc, vc, lo, lens, mask, d ** -0.5)
            assert torch.equal(out[False], out[True])
    finally:
        ops.attention_avx512(True)


def test_add_rms_norm_matches_torch():
    h, x, w = torch.randn(3, 24), torch.randn(3, 24), torch.rand(24)
    a, b = h.clone(), h.clone()
    KERNELS.add_rms_norm(a, x, w, 1e-6)
    b.add_(rms_norm(x, w, 1e-6))
    _close(a, b)


# ---- bad inputs are a RuntimeError, never a read or write past a buffer ------------------------------
def _rope_args(**bad):
    heads, kv_heads, d, m = 4, 2, 16, 3
    args = dict(qkv=torch.randn(m, (heads + 2 * kv_heads) * d), cos=torch.randn(m, d // 2), sin=torch.randn(m, d // 2),
                k_cache=torch.zeros(kv_heads, 12, d), v_cache=torch.zeros(kv_heads, 12, d),
                slots=torch.tensor([5, 2, 9]),
                heads=heads, kv_heads=kv_heads, q_norm=None, k_norm=None, eps=1e-6)
    args.update(bad)
    return list(args.values())


@pytest.mark.parametrize("bad", [
    dict(cos=torch.randn(3, 4), sin=torch.randn(3, 4)),  # a partial rotary table (D/4 wide)
    dict(cos=torch.randn(1, 8)),  # fewer rows than tokens
    dict(sin=torch.randn(3, 8, dtype=torch.float64)),
    dict(cos=torch.randn(8, 3).T),  # not contiguous
    dict(slots=torch.tensor([5, 2])),  # slots numel != M
    dict(slots=torch.tensor([5, 2, 9], dtype=torch.int32)),
    dict(slots=torch.tensor([5, 2, 12])),  # past the cache
    dict(k_cache=torch.zeros(3, 12, 16), v_cache=torch.zeros(3, 12, 16)),  # cache heads != kv_heads
    dict(v_cache=torch.zeros(2, 10, 16)),  # k and v caches differ
    dict(k_cache=torch.zeros(2, 12, 16, dtype=torch.float64)),
    dict(q_norm=torch.rand(8), k_norm=torch.rand(16)),  # per-head norm of the wrong size
    dict(k_norm=torch.rand(16, dtype=torch.float64)),
    dict(kv_heads=0),
])
def test_rope_kv_refuses_bad_inputs(bad):
    with pytest.raises(RuntimeError):
        KERNELS.ops.rope_kv(*_rope_args(**bad))


def _attention_args(**bad):
    m, heads, kv_heads, d = 2, 4, 2, 16
    args = dict(q=torch.randn(m, heads, d), k_cache=torch.randn(kv_heads, 32, d), v_cache=torch.randn(kv_heads, 32, d),
                lo=torch.zeros(m, dtype=torch.long), len=torch.full((m,), 8), allowed=None, scale=0.25)
    args.update(bad)
    return list(args.values())


@pytest.mark.parametrize("bad", [
    dict(allowed=torch.ones(2, 8, dtype=torch.float32)),  # `allowed` must be bool
    dict(allowed=torch.ones(2, 4, dtype=torch.bool)),  # narrower than the key range
    dict(k_cache=torch.randn(0, 32, 16), v_cache=torch.randn(0, 32, 16)),  # no kv heads
    dict(k_cache=torch.randn(2, 32, 32), v_cache=torch.randn(2, 32, 32)),  # head size != q's
    dict(q=torch.randn(2, 4, 24), k_cache=torch.randn(2, 32, 24), v_cache=torch.randn(2, 32, 24)),  # 24: no kernel
    dict(v_cache=torch.randn(2, 16, 16)),
    dict(len=torch.full((2,), 40)),  # keys past the cache
    dict(lo=torch.zeros(2, dtype=torch.int32)),
    dict(q=torch.randn(2, 4, 16, dtype=torch.float64)),
])
def test_attention_refuses_bad_inputs(bad):
    with pytest.raises(RuntimeError):
        KERNELS.ops.attention(*_attention_args(**bad))


def _linear_args(kind="int8", **bad):
    p = make_proj([torch.randn(12, 64)], [torch.randn(12)], tile=True)
    p = quantize(p, kind) if kind != "fp32" else p
    args = dict(x=torch.randn(2, 64), w=p.tiled, scale=p.scale, mins=p.mins, group=p.group, bias=p.bias,
                norm_w=torch.rand(64), eps=1e-6, n=p.n, mode=0, out=None)
    args.update(bad)
    return list(args.values())


@pytest.mark.parametrize("kind, bad", [
    ("int8", dict(scale=torch.rand(5))),  # per-row scales of the wrong length
    ("int8", dict(scale=torch.rand(12, dtype=torch.float64))),
    ("int8", dict(scale=None)),
    ("int4", dict(group=0)),
    ("int4", dict(scale=torch.rand(3, 1, 4, dtype=torch.float32))),  # fp32 instead of fp16
    ("int4", dict(mins=torch.rand(2, 1, 4).half())),
    ("fp32", dict(bias=torch.randn(7))),
    ("fp32", dict(bias=torch.randn(12, dtype=torch.float64))),
    ("fp32", dict(norm_w=torch.rand(32))),
    ("fp32", dict(norm_w=torch.rand(64).half())),
    ("fp32", dict(w=torch.randn(12 * 64, dtype=torch.float64))),
    ("fp32", dict(n=13)),  # weights do not match [n, K]
    ("fp32", dict(mode=1, out=torch.zeros(2, 12, dtype=torch.float64))),
    ("fp32", dict(mode=7)),
    ("fp32", dict(x=torch.randn(2, 64, dtype=torch.float64))),
])
def test_linear_refuses_bad_inputs(kind, bad):
    with pytest.raises(RuntimeError):
        KERNELS.ops.linear(*_linear_args(kind, **bad))


def test_add_rms_norm_refuses_bad_inputs():
    h, x = torch.randn(3, 24), torch.randn(3, 24)
    for w in (torch.rand(12), torch.rand(24, dtype=torch.float64)):
        with pytest.raises(RuntimeError):
            KERNELS.ops.add_rms_norm(h, x, w, 1e-6)
    with pytest.raises(RuntimeError):
        KERNELS.ops.add_rms_norm(h.double(), x.double(), torch.rand(24), 1e-6)


def test_good_inputs_still_pass_the_checks():
    KERNELS.ops.rope_kv(*_rope_args())
    KERNELS.ops.attention(*_attention_args())
    for kind in ("fp32", "int8", "int4"):
        KERNELS.ops.linear(*_linear_args(kind))


@pytest.mark.parametrize("v", [1, 7, 8, 9, 300, 49152 + 3])
@pytest.mark.parametrize("n", [1, 3, 20])
def test_first_argmax_is_torch_argmax_and_refuses_non_finite_rows(n, v):
    g = torch.Generator().manual_seed(n * v)
    x = torch.randint(-3, 4, (n, v), generator=g).float()  # few distinct values: ties everywhere
    assert torch.equal(kernels.module().first_argmax(x), x.argmax(-1))
    x[0, v // 2] = math.nan
    x[-1] = -math.inf  # no finite value
    if n > 2:
        x[1, v - 1] = math.inf
    out = kernels.module().first_argmax(x)
    assert out[0] == -1 and out[-1] == -1 and (n < 3 or out[1] == -1)
    assert torch.equal(out[2:-1], x[2:-1].argmax(-1))


@pytest.mark.parametrize("v", [5, 300, 65536 + 100])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_top_softmax_is_softmax_topk_with_ties_lower_column_first(v, k):
    g = torch.Generator().manual_seed(v + k)
    x = torch.randn(3, v, generator=g) * 4
    x[2] = torch.randint(-2, 3, (v,), generator=g).float()  # ties: lower column first, column 0 is argmax's
    cols, probs = kernels.module().top_softmax(x, k)
    # against softmax in double: torch's fp32 softmax sums 65k terms with ~1.6e-5 relative error on AVX2
    ref = torch.topk(torch.softmax(x.double(), -1), min(k, v))
    assert torch.equal(cols[:2, :min(k, v)], ref.indices[:2])
    assert torch.allclose(probs[:, :min(k, v)].double(), ref.values, rtol=1e-6, atol=1e-9)
    ranked = [(-float(x[2, j]), j) for j in cols[2, :min(k, v)].tolist()]
    assert cols[2, 0] == x[2].argmax() and ranked == sorted(ranked)
    assert (cols[:, min(k, v):] == -1).all()
    x[1, 3] = math.nan
    assert (kernels.module().top_softmax(x, k)[0][1] == -1).all()  # a non-finite row: no columns
