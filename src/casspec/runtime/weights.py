"""Weights as the runtime reads them: projections in the kernels' tiled layout, fp32, int8 or int4.

A `Proj` is one projection y = x W^T + b, or several fused side by side (q|k|v, gate|up). The fp32
variant keeps the HF parameters themselves (shared, never copied) for the torch backend, plus a tiled
copy for the CPU kernels. The quantized variants are the DSIA "quantization" drafts, weight-only with
fp32 activations, stored tiled only:
  int8  per-row symmetric scale                      (8 bits/weight)
  int4  per-(row, group of G columns) fp16 scale d and min m, w = d q + m, q in [0, 15]  (4.5 bits at G=64)
The torch backend reads quantized weights dequantized (once, on first use).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from casspec.runtime import lowbit
from casspec.runtime.gguf_file import NativeTensor

PROJ_NAMES = ("qkv", "o", "gate_up", "down")
TILE_ROWS, TILE_K = 4, 8  # the kernels' tile: 4 weight rows x 8 columns per step (cpu_kernels.cpp)
INT4_GROUP = 64  # columns per int4 scale; not the GGUF's 32, so the draft is not the target's own 4-bit blocks


@dataclass
class Proj:
    """y = x W^T + b over row blocks of sizes `sizes` stacked in order (a fused projection)."""

    sizes: tuple[int, ...]  # output rows of each fused part
    k: int  # input columns
    parts: tuple[torch.Tensor, ...] | None = None  # fp32: [N_i, K] HF parameters, shared
    bias: torch.Tensor | None = None  # [N] in the order of the parts
    glu: str | None = None  # two parts (gate, up): the output is act(gate) * up, act = "silu" | "gelu_tanh"
    kind: str = "fp32"  # "fp32" | "int8" | "int4" | "native" (the blocks the model ships in, read in place)
    tiled: torch.Tensor | None = None  # the kernels' layout, or None where the kernels do not apply
    scale: torch.Tensor | None = None  # int8: [N] fp32 per kernel row; int4: [tiles, K/G, 4] fp16
    mins: torch.Tensor | None = None  # int4: [tiles, K/G, 4] fp16
    group: int = 0  # int4 columns per scale
    native: tuple[NativeTensor, ...] | None = None  # "native": one block tensor per part
    act8: bool = False  # native: int8 activations and integer dot products (a draft; kernels/native_a8.h)
    _dense: tuple[torch.Tensor, ...] | None = field(default=None, repr=False)

    n: int = field(init=False)  # output rows, sum(sizes)

    def __post_init__(self) -> None:
        self.n = sum(self.sizes)
        if self.native is not None:  # what the kernel call takes, built once
            self.blocks = [t.blocks for t in self.native]
            self.qtypes = [t.qtype for t in self.native]

    @property
    def nbytes(self) -> int:
        """Bytes one forward reads for this projection through the kernels (or the torch path)."""
        if self.native is not None:
            return sum(t.nbytes for t in self.native)
        tensors = [self.tiled, self.scale, self.mins] if self.tiled is not None else list(self.weights())
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @property
    def formats(self) -> str:
        """The weight format(s), e.g. "Q4_1", "Q5_0+Q8_0", "fp32", "int8"."""
        names = dict.fromkeys(t.type_name for t in self.native) if self.native is not None else [self.kind]
        return "+".join(names)

    def weights(self) -> tuple[torch.Tensor, ...]:
        """Float [N_i, K] row blocks for the torch backend (quantized ones dequantized on first use;
        native blocks dequantized on every call, so no fp32 copy of the model stays in memory)."""
        if self.parts is not None:
            return self.parts
        if self.native is not None:
            return tuple(t.dequantize() for t in self.native)
        if self._dense is None:
            self._dense = _logical_rows(_dequantize(self), self.glu).split(self.sizes)
        return self._dense


def make_proj(parts: list[torch.Tensor | NativeTensor], bias: list[torch.Tensor | None] | None = None,
              glu: str | None = None, tile: bool = False) -> Proj:
    """A projection over `parts` (bias per part, None where a part has none), tiled for the kernels if asked.
    With `tile`, block tensors and bf16 / fp16 parameters stay as they are and the kernels read them."""
    shapes = [p.shape if isinstance(p, NativeTensor) else tuple(p.shape) for p in parts]
    b = None
    if bias is not None and any(x is not None for x in bias):
        b = torch.cat([x.detach().float() if x is not None else torch.zeros(s[0]) for x, s in zip(bias, shapes)])
    sizes, k = tuple(int(s[0]) for s in shapes), int(shapes[0][1])
    native = [p if isinstance(p, NativeTensor) else _as_blocks(p) for p in parts] if tile else []
    if native and all(t is not None and k % 32 == 0 for t in native) and any(
            isinstance(p, NativeTensor) or p.dtype != torch.float32 for p in parts):
        return Proj(sizes, k, bias=b, glu=glu, kind="native", native=tuple(t for t in native if t is not None))
    parts_t = tuple(p.dequantize() if isinstance(p, NativeTensor) else p.detach() for p in parts)
    proj = Proj(sizes, k, parts_t, b, glu)
    if tile and tileable(proj):
        proj.tiled = _tile(_kernel_rows(torch.cat(parts_t), glu))
    return proj


def _as_blocks(w: torch.Tensor) -> NativeTensor | None:
    """A CPU parameter as the kernels' blocks (a view, never a copy): bf16 / fp16 / fp32 rows."""
    qtype = {torch.bfloat16: 30, torch.float16: 1, torch.float32: 0}.get(w.dtype)
    if qtype is None or w.device.type != "cpu" or w.dim() != 2:
        return None
    w = w.detach().contiguous()
    return NativeTensor(w.view(torch.uint8).reshape(w.shape[0], -1), qtype, (int(w.shape[0]), int(w.shape[1])))


def tileable(p: Proj) -> bool:
    """The kernels read fp32 CPU weights with K a multiple of 8 (and an even gate width for gated MLPs)."""
    if p.native is not None:
        return p.k % TILE_K == 0 and (p.glu is None or (len(p.sizes) == 2 and p.sizes[0] % 2 == 0))
    w = p.parts[0] if p.parts is not None else p.tiled
    assert w is not None  # a projection has float parts or tiled weights
    return (w.device.type == "cpu" and (p.kind != "fp32" or w.dtype == torch.float32) and p.k % TILE_K == 0
            and (p.glu is None or (len(p.sizes) == 2 and p.sizes[0] % 2 == 0)))


def quantize(p: Proj, kind: str = "int8", group: int = INT4_GROUP) -> Proj:
    """A quantized copy (`kind` "int8" or "int4"); biases stay fp32. Untileable projections keep fp32
    weights holding the quantized values (the torch backend computes the same function)."""
    rows = torch.cat(p.weights()).float()  # [N, K] logical order
    if kind == "int8":
        q8, scale = _quantize_int8(rows)
        out = replace(p, parts=None, kind="int8", tiled=None, scale=None, mins=None, group=0, native=None, _dense=None)
        if not tileable(p):
            return replace(out, parts=tuple((q8.float() * scale[:, None]).split(p.sizes)))
        out.tiled, out.scale = _tile(_kernel_rows(q8, p.glu)), _kernel_rows(scale[:, None], p.glu)[:, 0].contiguous()
        return out
    if kind != "int4":
        raise ValueError(f"unknown quantization {kind!r}; use 'int8' or 'int4'")
    group = next(g for g in (group, 32, 16, 8) if p.k % g == 0)  # the kernels need a multiple of 32
    q4, d, m = _quantize_int4(rows, group)
    out = replace(p, parts=None, kind="int4", tiled=None, scale=None, mins=None, group=group, native=None,
                  _dense=None)
    if not tileable(p) or group % 32:
        return replace(out, parts=tuple(_dequant_groups(q4, d, m).split(p.sizes)))
    out.tiled, out.scale, out.mins = _tile_int4(_kernel_rows(q4, p.glu), group), _tile_groups(
        _kernel_rows(d, p.glu)), _tile_groups(_kernel_rows(m, p.glu))
    return out


def _quantize_int8(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (rows.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # [N]
    return torch.round(rows / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def with_act8(p: Proj) -> Proj:
    """`p` read with int8 activations where it has blocks with an integer view (else as it is)."""
    return replace(p, act8=p.native is not None)


def reencode(p: Proj, qtype: int) -> Proj:
    """`p` re-encoded part by part in block format `qtype` (runtime/lowbit.py), read with int8 activations."""
    parts: list[torch.Tensor | NativeTensor] = [
        NativeTensor(lowbit.encode(dense, qtype), qtype, (int(dense.shape[0]), int(dense.shape[1])))
        for dense in p.weights()]  # [N_i, K] fp32 each
    bias = None if p.bias is None else list(p.bias.split(list(p.sizes)))
    return with_act8(make_proj(parts, bias, glu=p.glu, tile=True))


def _quantize_int4(rows: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [N, K] uint8 in [0, 15], d and m [N, K/G] fp16 (rounded first, so q fits what is stored)."""
    n, k = rows.shape
    g = rows.reshape(n, k // group, group)
    lo, hi = g.amin(dim=2), g.amax(dim=2)
    d = ((hi - lo) / 15.0).clamp(min=1e-8).half()
    m = lo.half()
    q = torch.round((g - m.float()[..., None]) / d.float()[..., None]).clamp(0, 15).to(torch.uint8)
    return q.reshape(n, k), d, m


def _dequant_groups(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    groups = d.shape[1]
    g = q.reshape(n, groups, k // groups).float() * d.float()[..., None] + m.float()[..., None]
    return g.reshape(n, k)


def _kernel_rows(rows: torch.Tensor, glu: str | None) -> torch.Tensor:
    """Rows in the order the kernel's tiles hold them: as stacked, or gate/up interleaved two by two."""
    if glu is None:
        return rows
    f = rows.shape[0] // 2
    gate, up = rows[:f], rows[f:]
    return torch.stack([gate.reshape(f // 2, 2, -1), up.reshape(f // 2, 2, -1)], dim=1).reshape(2 * f, -1)


def _logical_rows(rows: torch.Tensor, glu: str | None) -> torch.Tensor:
    """Inverse of `_kernel_rows`."""
    if glu is None:
        return rows
    pairs = rows.reshape(-1, 2, 2, rows.shape[1])  # [F/2, gate|up, 2, K]
    return torch.cat([pairs[:, 0].reshape(-1, rows.shape[1]), pairs[:, 1].reshape(-1, rows.shape[1])])


def _pad_rows(w: torch.Tensor) -> torch.Tensor:
    n = w.shape[0]
    return w if n % TILE_ROWS == 0 else torch.cat([w, w.new_zeros(TILE_ROWS - n % TILE_ROWS, *w.shape[1:])])


def _tile(w: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [ceil(N/4), K/8, 4, 8]: one tile of 4 rows is one contiguous stream (zero rows pad N)."""
    w = _pad_rows(w)
    return w.reshape(-1, TILE_ROWS, w.shape[1] // TILE_K, TILE_K).transpose(1, 2).contiguous()


def _tile_int4(q: torch.Tensor, group: int) -> torch.Tensor:
    """[N, K] uint8 -> [tiles, K/G, 4, G/2]: per 32 columns, byte j = col j | col j + 16 << 4."""
    q = _pad_rows(q)
    n, k = q.shape
    c = q.reshape(n, k // 32, 2, 16)
    packed = (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n // TILE_ROWS, TILE_ROWS, k // group, group // 2)
    return packed.transpose(1, 2).contiguous()


def _tile_groups(s: torch.Tensor) -> torch.Tensor:
    """[N, K/G] -> [tiles, K/G, 4]."""
    s = _pad_rows(s)
    return s.reshape(-1, TILE_ROWS, s.shape[1]).transpose(1, 2).contiguous()


def _dequantize(p: Proj) -> torch.Tensor:
    """Kernel-order fp32 rows [N, K] of a tiled quantized projection."""
    t, scale = p.tiled, p.scale
    assert t is not None and scale is not None  # a tiled quantized projection has both
    if p.kind == "int8":
        rows = t.transpose(1, 2).reshape(-1, p.k)[: p.n].float()
        return rows * scale[:, None]
    tiles, groups = t.shape[0], t.shape[1]
    lo, hi = t & 0x0F, t >> 4  # [tiles, K/G, 4, G/2]
    q = torch.stack([lo.reshape(*lo.shape[:3], -1, 16), hi.reshape(*hi.shape[:3], -1, 16)], dim=-2)
    q = q.reshape(tiles, groups, TILE_ROWS, p.group).float()
    assert p.mins is not None  # int4
    w = q * scale.float()[..., None] + p.mins.float()[..., None]  # [tiles, K/G, 4, G]
    return w.transpose(1, 2).reshape(tiles * TILE_ROWS, p.k)[: p.n]


@dataclass
class LayerWeights:
    """One decoder layer: fused projections and effective RMSNorm weights (Gemma's 1 + w folded in)."""

    qkv: Proj
    o: Proj
    gate_up: Proj
    down: Proj
    attn_norm: torch.Tensor  # [d]
    mlp_norm: torch.Tensor  # [d]
    post_attn_norm: torch.Tensor | None = None  # Gemma 3 sandwich norms
    post_mlp_norm: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None  # [D] per-head norms (Qwen3, Gemma 3)
    k_norm: torch.Tensor | None = None
    kernel: object = field(default=None, init=False, repr=False, compare=False)  # the kernels' bound layer (a
    # KernelBackend's, False where it has none); init=False: a layer made by replace() binds its own

    def projections(self) -> list[Proj]:
        return [self.qkv, self.o, self.gate_up, self.down]


@dataclass
class ModelWeights:
    """Every layer plus the head (the final norm runs as the head's prologue)."""

    layers: list[LayerWeights]
    head: Proj
    final_norm: torch.Tensor  # [d]

    def named_projections(self) -> dict[str, Proj]:
        """Every projection by a stable key ("head", "<layer>.qkv", ...)."""
        out = {"head": self.head}
        for i, lw in enumerate(self.layers):
            out.update({f"{i}.{name}": p for name, p in zip(PROJ_NAMES, lw.projections())})
        return out

    def map_projections(self, fn: Callable[[str, Proj], Proj]) -> ModelWeights:
        """A copy with every projection replaced by fn(key, projection); norms are shared."""
        # (the keys are LayerWeights' Proj fields; mypy checks a **dict against every field's type)
        layers = [replace(lw, **{name: fn(f"{i}.{name}", p)  # type: ignore[arg-type]
                                 for name, p in zip(PROJ_NAMES, lw.projections())})
                  for i, lw in enumerate(self.layers)]
        return ModelWeights(layers, fn("head", self.head), self.final_norm)

    def quantized(self, kind: str) -> ModelWeights:
        """Every projection quantized (`kind` "int8" or "int4")."""
        return self.map_projections(lambda _key, p: quantize(p, kind))

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for lw in self.layers for p in lw.projections()) + self.head.nbytes
