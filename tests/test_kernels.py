"""casspec's CPU kernels compute what the torch backend computes (allclose), batch-invariantly."""
from __future__ import annotations

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


@pytest.mark.parametrize("n,k", [(12, 16), (13, 24), (64, 40), (96, 576)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 16, 64])
@pytest.mark.parametrize("int8", [False, True])
def test_linear_matches_torch(n, k, rows, int8):
    g = torch.Generator().manual_seed(n * rows)
    w, b, nw = torch.randn(n, k, generator=g), torch.randn(n, generator=g), torch.rand(k, generator=g) + 0.5
    p = make_proj([w[: n // 3], w[n // 3:]], [b[: n // 3], b[n // 3:]], tile=True)
    p = quantize(p) if int8 else p
    x = torch.randn(rows, k, generator=g)
    _close(KERNELS.linear(x, p, nw, 1e-5), TORCH.linear(x, p, nw, 1e-5))
    h = torch.randn(rows, n, generator=g)
    _close(KERNELS.linear(x, p, out=h.clone()), TORCH.linear(x, p, out=h.clone()))


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_gated_mlp_matches_torch(act, rows):
    g = torch.Generator().manual_seed(rows)
    gate, up, x = torch.randn(10, 32, generator=g), torch.randn(10, 32, generator=g), torch.randn(rows, 32, generator=g)
    p = make_proj([gate, up], glu=act, tile=True)
    want = (F.silu(x @ gate.T) if act == "silu" else F.gelu(x @ gate.T, approximate="tanh")) * (x @ up.T)
    _close(KERNELS.linear(x, p), want)
    _close(KERNELS.linear(x, quantize(p)), TORCH.linear(x, quantize(p)))


@pytest.mark.parametrize("int8", [False, True])
def test_linear_rows_are_batch_invariant(int8):
    """A row's output is bitwise the same computed alone or among others (greedy exactness of chains)."""
    p = make_proj([torch.randn(40, 64)], tile=True)
    p = quantize(p) if int8 else p
    x = torch.randn(9, 64)
    batch = KERNELS.linear(x, p)
    for i in range(9):
        assert torch.equal(KERNELS.linear(x[i:i + 1], p)[0], batch[i])


def test_quantize_is_per_row_int8():
    w = torch.randn(8, 16) * torch.logspace(-2, 2, 8)[:, None]
    q = quantize(make_proj([w], tile=True))
    assert q.parts[0].dtype == torch.int8 and q.int8
    deq = q.weights()[0]
    assert ((deq - w).abs() <= q.scale[:, None] / 2 + 1e-6).all()


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
    for mask in (None, allowed):
        _close(KERNELS.attention(q, kc, vc, kv_len, mask, d ** -0.5), TORCH.attention(q, kc, vc, kv_len, mask, d ** -0.5),
               rel=1e-4)


def test_attention_of_a_chain_equals_decoding_one_token_at_a_time():
    """Causally masked rows see exactly what each token saw when decoded alone (bitwise)."""
    kc, vc = torch.randn(2, 600, 64), torch.randn(2, 600, 64)
    q = torch.randn(6, 4, 64)
    base = 510  # the chain crosses a key-block boundary
    allowed = torch.arange(base + 6)[None, :] <= (base + torch.arange(6))[:, None]
    chain = KERNELS.attention(q, kc, vc, base + 6, allowed, 0.125)
    for i in range(6):
        alone = KERNELS.attention(q[i:i + 1].contiguous(), kc, vc, base + i + 1, None, 0.125)
        assert torch.equal(alone[0], chain[i])


def test_add_rms_norm_matches_torch():
    h, x, w = torch.randn(3, 24), torch.randn(3, 24), torch.rand(24)
    a, b = h.clone(), h.clone()
    KERNELS.add_rms_norm(a, x, w, 1e-6)
    b.add_(rms_norm(x, w, 1e-6))
    _close(a, b)
