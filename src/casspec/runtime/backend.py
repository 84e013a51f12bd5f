"""The five ops a forward is made of, behind one interface with two implementations.

    linear(x, proj, norm)        y = rmsnorm(x) W^T + b, optionally accumulated into `out` or gated (GLU)
    rope_kv(qkv, ...)            RoPE on q and k (after per-head norms), k and v written at cache slots
    attention(q, k, v, lo, len)  softmax(q k^T * scale, masked) v; row m over cache slots lo[m] .. lo[m] + len[m]
    add_rms_norm(h, x, w)        h += rmsnorm(x) * w  (Gemma 3's post-norms)

and `layer`, the ops of one decoder layer in one call where a backend can (the kernels: layer.cpp), else False
and the runner calls them one by one.

`TorchBackend` is stock torch (any device and dtype; prefill; machines without the kernels).
`KernelBackend` runs the same math in casspec's CPU kernels for fp32 activations (weights tiled fp32 /
int8 / int4, or native: GGUF blocks, bf16, fp16 read in place), and defers to the torch backend where a
projection has neither. Both compute the same function; tests hold them to
allclose. The runner sends prefills longer than `MAX_KERNEL_ROWS` tokens to the torch backend.
"""
from __future__ import annotations

import time
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F

from casspec.runtime import kernels
from casspec.runtime.weights import LayerWeights, Proj

MAX_KERNEL_ROWS = 64  # longer prefills are compute-bound: MKL's blocked GEMM is as fast there
_GLU_MODE = {"silu": 2, "gelu_tanh": 3}
_ACCUMULATE = 1


def _attention_kernel_fits(head_dim: int) -> bool:
    """Whether the attention kernel takes this head size (multiples of 64, or 8 / 16 / 32)."""
    return head_dim % 64 == 0 or head_dim in (8, 16, 32)


class LayerShape(NamedTuple):
    """What a decoder layer's ops take beside its weights."""

    heads: int
    kv_heads: int
    eps: float  # RMSNorm epsilon
    scale: float  # attention scale


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm: normalize in fp32, scale by the (effective) weight, cast back."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # x [M, h, D], cos [M, D/2]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None], sin[:, None]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


class Backend(Protocol):
    """The interface: what the runner calls (TorchBackend, KernelBackend, TimedBackend)."""

    name: str

    def linear(self, x: torch.Tensor, p: Proj, norm: torch.Tensor | None = None, eps: float = 0.0,
               out: torch.Tensor | None = None) -> torch.Tensor: ...

    def rope_kv(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, slots: torch.Tensor, heads: int, kv_heads: int,
                q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, eps: float) -> torch.Tensor: ...

    def attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lo: torch.Tensor,
                  lens: torch.Tensor, allowed: torch.Tensor | None, scale: float) -> torch.Tensor: ...

    def add_rms_norm(self, h: torch.Tensor, x: torch.Tensor, w: torch.Tensor, eps: float) -> None: ...

    def layer(self, lw: LayerWeights, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], k_cache: torch.Tensor,
              v_cache: torch.Tensor, slots: torch.Tensor, lo: torch.Tensor, lens: torch.Tensor,
              mask: torch.Tensor | None, shape: LayerShape, attn: bool, mlp: bool) -> bool: ...


class TorchBackend:
    """The ops in stock torch."""

    name = "torch"

    def linear(self, x: torch.Tensor, p: Proj, norm: torch.Tensor | None = None, eps: float = 0.0,
               out: torch.Tensor | None = None) -> torch.Tensor:  # x [M, K] -> [M, N] (GLU: [M, N/2])
        if norm is not None:
            x = rms_norm(x, norm, eps)
        ys = [F.linear(x, w.to(x.dtype)) for w in p.weights()]
        y = torch.cat(ys, dim=-1) if len(ys) > 1 else ys[0]
        if p.bias is not None:
            y = y + p.bias
        if p.glu is not None:
            gate, up = y.chunk(2, dim=-1)
            y = (F.silu(gate) if p.glu == "silu" else F.gelu(gate, approximate="tanh")) * up
        return out.add_(y) if out is not None else y

    def rope_kv(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, slots: torch.Tensor, heads: int, kv_heads: int,
                q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, eps: float) -> torch.Tensor:
        """Returns q [M, H, D]; writes k, v [M, Hkv, D] into the caches [Hkv, S, D] at `slots`."""
        m, d = qkv.shape[0], k_cache.shape[-1]
        q, k, v = qkv.view(m, heads + 2 * kv_heads, d).split([heads, kv_heads, kv_heads], dim=1)
        if q_norm is not None:
            assert k_norm is not None, "q_norm and k_norm come together"
            q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        k_cache.index_copy_(1, slots, k.transpose(0, 1).to(k_cache.dtype))
        v_cache.index_copy_(1, slots, v.transpose(0, 1).to(v_cache.dtype))
        return q

    def attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lo: torch.Tensor,
                  lens: torch.Tensor, allowed: torch.Tensor | None, scale: float) -> torch.Tensor:
        """q [M, H, D] -> [M, H*D]. Row m attends to cache slots lo[m] .. lo[m] + lens[m] - 1, filtered by
        allowed[m, j] ([M, W], j relative to lo[m]) when given. Rows sharing a key range go in one SDPA."""
        out = q.new_empty(q.shape[0], q.shape[1] * q.shape[2])
        ranges = torch.stack([lo, lens], dim=1).tolist()
        groups: dict[tuple[int, int], list[int]] = {}
        for m, (start, n) in enumerate(ranges):
            groups.setdefault((start, n), []).append(m)
        for (start, n), rows in groups.items():
            idx = torch.tensor(rows, device=q.device)
            k, v = k_cache[None, :, start:start + n], v_cache[None, :, start:start + n]  # [1, Hkv, n, D]
            mask = None if allowed is None else allowed[idx, :n][None, None]
            o = F.scaled_dot_product_attention(q[idx].transpose(0, 1)[None], k, v, attn_mask=mask, scale=scale,
                                               enable_gqa=q.shape[1] != k.shape[1])  # [1, H, rows, D]
            out[idx] = o[0].transpose(0, 1).reshape(len(rows), -1)
        return out

    def add_rms_norm(self, h: torch.Tensor, x: torch.Tensor, w: torch.Tensor, eps: float) -> None:
        h.add_(rms_norm(x, w, eps))

    def layer(self, lw: LayerWeights, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], k_cache: torch.Tensor,
              v_cache: torch.Tensor, slots: torch.Tensor, lo: torch.Tensor, lens: torch.Tensor,
              mask: torch.Tensor | None, shape: LayerShape, attn: bool, mlp: bool) -> bool:
        """No fused layer: the runner calls the ops one by one."""
        return False


class KernelBackend(TorchBackend):
    """The ops in casspec's CPU kernels (fp32, up to MAX_KERNEL_ROWS rows), else the torch ones."""

    name = "kernels"

    def __init__(self) -> None:
        self.ops = kernels.module()

    def linear(self, x: torch.Tensor, p: Proj, norm: torch.Tensor | None = None, eps: float = 0.0,
               out: torch.Tensor | None = None) -> torch.Tensor:
        mode = _GLU_MODE[p.glu] if p.glu else (_ACCUMULATE if out is not None else 0)
        if p.native is not None:
            return self.ops.native_linear(x, p.blocks, p.qtypes, p.bias, norm, eps, mode, out, p.act8)
        if p.tiled is None:
            return super().linear(x, p, norm, eps, out)
        return self.ops.linear(x, p.tiled, p.scale, p.mins, p.group, p.bias, norm, eps, p.n, mode, out)

    def rope_kv(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, slots: torch.Tensor, heads: int, kv_heads: int,
                q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, eps: float) -> torch.Tensor:
        return self.ops.rope_kv(qkv, cos, sin, k_cache, v_cache, slots, heads, kv_heads, q_norm, k_norm, eps)

    def attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lo: torch.Tensor,
                  lens: torch.Tensor, allowed: torch.Tensor | None, scale: float) -> torch.Tensor:
        d = k_cache.shape[-1]
        if not _attention_kernel_fits(d):
            return super().attention(q, k_cache, v_cache, lo, lens, allowed, scale)
        return self.ops.attention(q, k_cache, v_cache, lo, lens, allowed, scale)

    def add_rms_norm(self, h: torch.Tensor, x: torch.Tensor, w: torch.Tensor, eps: float) -> None:
        self.ops.add_rms_norm(h, x, w, eps)

    def layer(self, lw: LayerWeights, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], k_cache: torch.Tensor,
              v_cache: torch.Tensor, slots: torch.Tensor, lo: torch.Tensor, lens: torch.Tensor,
              mask: torch.Tensor | None, shape: LayerShape, attn: bool, mlp: bool) -> bool:
        """h += attention, then h += MLP in one kernel call (layer.cpp: the same ops, in the same order), where
        every projection has a kernel and the head size an attention kernel; False: the runner calls the ops."""
        if lw.kernel is None:
            lw.kernel = self._bind(lw, shape, k_cache.shape[-1])
        if lw.kernel is False:
            return False
        self.ops.layer_forward(lw.kernel, h, rope[0], rope[1], k_cache, v_cache, slots, lo, lens, mask, attn, mlp)
        return True

    def _bind(self, lw: LayerWeights, shape: LayerShape, head_dim: int) -> object:
        projs = lw.projections()
        if not _attention_kernel_fits(head_dim) or any(p.native is None and p.tiled is None for p in projs):
            return False
        bound = [self._projection(p) for p in projs]
        return self.ops.Layer(*bound, lw.attn_norm, lw.mlp_norm, lw.post_attn_norm, lw.post_mlp_norm, lw.q_norm,
                              lw.k_norm, *shape)

    def _projection(self, p: Proj) -> object:
        glu = _GLU_MODE[p.glu] if p.glu else 0
        if p.native is not None:
            return self.ops.Projection(p.blocks, p.qtypes, None, None, None, 0, p.n, p.bias, glu, p.act8)
        return self.ops.Projection([], [], p.tiled, p.scale, p.mins, p.group, p.n, p.bias, glu, False)


class TimedBackend:
    """Wraps a backend and adds up the seconds spent in its linears and in everything else it runs
    (`casspec profile`: how much of a forward is weight traffic and how much is the rest)."""

    def __init__(self, inner: Backend) -> None:
        self.inner, self.name = inner, inner.name
        self.seconds = {"linear": 0.0, "attention": 0.0, "other": 0.0}

    def _timed(self, kind: str, fn, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.seconds[kind] += time.perf_counter() - t0
        return out

    def linear(self, *args, **kwargs) -> torch.Tensor:  # noqa: ANN002, ANN003
        return self._timed("linear", self.inner.linear, *args, **kwargs)

    def attention(self, *args, **kwargs) -> torch.Tensor:  # noqa: ANN002, ANN003
        return self._timed("attention", self.inner.attention, *args, **kwargs)

    def rope_kv(self, *args, **kwargs) -> torch.Tensor:  # noqa: ANN002, ANN003
        return self._timed("other", self.inner.rope_kv, *args, **kwargs)

    def add_rms_norm(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        return self._timed("other", self.inner.add_rms_norm, *args, **kwargs)

    def layer(self, *args, **kwargs) -> bool:  # noqa: ANN002, ANN003
        return False  # timed op by op
