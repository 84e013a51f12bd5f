"""Weights as the runtime reads them: projections in the kernels' tiled layout, fp32 or int8.

A `Proj` is one projection y = x W^T + b, or several fused side by side (q|k|v, gate|up). It keeps
the HF parameters themselves (shared, never copied) for the torch backend, and a tiled copy for the
CPU kernels. `quantize` makes the int8 variant of a layer: per-row symmetric int8 weights with fp32
activations (weight-only quantization, the DSIA "quantization" draft); norms and biases are shared.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

TILE_ROWS, TILE_K = 4, 8  # the kernels' tile: 4 weight rows x 8 columns per step (cpu_kernels.cpp)


@dataclass
class Proj:
    """y = x W^T + b, with W the row blocks `parts` stacked in order (a fused projection)."""

    parts: tuple[torch.Tensor, ...]  # [N_i, K] each: HF parameters, shared (int8: the int8 rows)
    bias: torch.Tensor | None = None  # [N] in the order of `parts`
    glu: str | None = None  # parts = (gate, up): the output is act(gate) * up, act = "silu" | "gelu_tanh"
    tiled: torch.Tensor | None = None  # the kernels' layout (fp32 or int8), or None where it does not apply
    scale: torch.Tensor | None = None  # int8: [N] per-row scales in the order of `parts`
    tiled_scale: torch.Tensor | None = None  # the same scales in tiled row order
    _dequantized: tuple[torch.Tensor, ...] | None = field(default=None, repr=False)

    @property
    def n(self) -> int:
        return sum(int(p.shape[0]) for p in self.parts)

    @property
    def k(self) -> int:
        return int(self.parts[0].shape[1])

    @property
    def int8(self) -> bool:
        return self.scale is not None

    @property
    def nbytes(self) -> int:
        """Bytes one forward reads for this projection."""
        return sum(p.numel() * p.element_size() for p in self.parts)

    def weights(self) -> tuple[torch.Tensor, ...]:
        """Float row blocks for the torch backend (int8 rows dequantized once, on first use)."""
        if not self.int8:
            return self.parts
        if self._dequantized is None:
            scales = self.scale.split([int(p.shape[0]) for p in self.parts])
            self._dequantized = tuple(p.float() * s[:, None] for p, s in zip(self.parts, scales))
        return self._dequantized


def make_proj(parts: list[torch.Tensor], bias: list[torch.Tensor | None] | None = None, glu: str | None = None,
              tile: bool = False) -> Proj:
    """A projection over `parts` (bias per part, None where a part has none), tiled for the kernels if asked."""
    parts = tuple(p.detach() for p in parts)
    b = None
    if bias is not None and any(x is not None for x in bias):
        b = torch.cat([x.detach() if x is not None else p.new_zeros(p.shape[0]) for x, p in zip(bias, parts)])
    proj = Proj(parts, b, glu)
    if tile and tileable(proj):
        proj.tiled = _tile(_kernel_rows(proj))
    return proj


def tileable(p: Proj) -> bool:
    """The kernels read fp32 CPU weights with K a multiple of 8 (and an even gate width for gated MLPs)."""
    w = p.parts[0]
    return (w.device.type == "cpu" and w.dtype == torch.float32 and p.k % TILE_K == 0
            and (p.glu is None or (len(p.parts) == 2 and p.parts[0].shape[0] % 2 == 0)))


def quantize(p: Proj) -> Proj:
    """int8 copy: per-row symmetric scales, round to nearest; biases stay fp32."""
    rows = torch.cat(p.parts).float()  # [N, K]
    scale = (rows.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # [N]
    q = torch.round(rows / scale[:, None]).clamp(-127, 127).to(torch.int8)  # [N, K]
    sizes = [int(x.shape[0]) for x in p.parts]
    out = Proj(tuple(q.split(sizes)), p.bias, p.glu, scale=scale)
    if tileable(p):
        out.tiled = _tile(_kernel_rows(out))
        out.tiled_scale = _kernel_rows(Proj(tuple(scale[:, None].split(sizes)), glu=p.glu))[:, 0].contiguous()
    return out


def _kernel_rows(p: Proj) -> torch.Tensor:
    """Rows in the order the kernel's tiles hold them: as stacked, or gate/up interleaved two by two."""
    if p.glu is None:
        return torch.cat(p.parts)
    gate, up = p.parts
    f, k = gate.shape
    return torch.stack([gate.reshape(f // 2, 2, k), up.reshape(f // 2, 2, k)], dim=1).reshape(2 * f, k)


def _tile(w: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [ceil(N/4), K/8, 4, 8]: one tile of 4 rows is one contiguous stream (zero rows pad N)."""
    n, k = w.shape
    if n % TILE_ROWS:
        w = torch.cat([w, w.new_zeros(TILE_ROWS - n % TILE_ROWS, k)])
    return w.reshape(-1, TILE_ROWS, k // TILE_K, TILE_K).transpose(1, 2).contiguous()


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

    def quantized(self) -> LayerWeights:
        """The int8 variant of this layer (projections quantized, norms shared)."""
        return replace(self, qkv=quantize(self.qkv), o=quantize(self.o), gate_up=quantize(self.gate_up),
                       down=quantize(self.down))

    def projections(self) -> list[Proj]:
        return [self.qkv, self.o, self.gate_up, self.down]


@dataclass
class ModelWeights:
    """Every layer plus the head (the final norm runs as the head's prologue)."""

    layers: list[LayerWeights]
    head: Proj
    final_norm: torch.Tensor  # [d]
    meta: dict[str, float] = field(default_factory=dict)

    def quantized(self) -> ModelWeights:
        return ModelWeights([lw.quantized() for lw in self.layers], quantize(self.head), self.final_norm, self.meta)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for lw in self.layers for p in lw.projections()) + self.head.nbytes
