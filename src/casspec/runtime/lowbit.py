"""Low-bit block formats for draft copies of the weights: 2 and 3 bits a weight plus a scale and a min per 32.

casspec's own formats (not ggml types), read by the same kernels as the GGUF blocks
(kernels/gguf_blocks.h `LowBitB`), with fp32 or int8 activations:

    Q2_1  12 B / 32 weights (3.0 bits):  fp16 d, fp16 m, 8 B of 2-bit q      w = d * q + m, q in [0, 3]
    Q3_1  16 B / 32 weights (4.0 bits):  as Q2_1 plus 4 B of third bits       w = d * q + m, q in [0, 7]

Weight j of a block keeps its low two bits in bits 2 (j // 8) of byte j % 8 (so one 64-bit load and a
per-lane shift give all 32), and its third bit in bit j of the last four bytes. `quantize` picks each
block's range by a small search over clipped (min, max) pairs that minimizes the block's squared error,
as llama.cpp's k-quants do, since at 2-3 bits plain min-max wastes levels on outliers.
"""
from __future__ import annotations

import gguf
import numpy as np
import torch

Q2_1, Q3_1 = 252, 253  # type ids outside ggml's range
Q8_0, Q4_0 = int(gguf.GGMLQuantizationType.Q8_0), int(gguf.GGMLQuantizationType.Q4_0)
CANDIDATES = (Q8_0, Q4_0, Q3_1, Q2_1)  # formats a draft copy of a projection may take (8.5 .. 3 bits a weight)
BITS = {Q2_1: 2, Q3_1: 3}
BLOCK_BYTES = {Q2_1: 12, Q3_1: 16}
NAMES = {Q2_1: "Q2_1", Q3_1: "Q3_1"}
QK = 32
_CLIPS = (0.0, 0.05, 0.1, 0.18)  # fractions of a block's range tried off each end
_CHUNK = 8192  # rows quantized at a time (bounds the temporaries)


def row_bytes(qtype: int, k: int) -> int:
    """Bytes of one row of k weights in `qtype` (casspec's formats or any ggml type)."""
    if qtype in BLOCK_BYTES:
        return k // QK * BLOCK_BYTES[qtype]
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
    return k // block * size


def name(qtype: int) -> str:
    return NAMES.get(qtype) or gguf.GGMLQuantizationType(qtype).name


def encode(w: torch.Tensor, qtype: int) -> torch.Tensor:  # [N, K] fp32 -> [N, row bytes] uint8
    """`w` in a candidate format: casspec's Q2_1 / Q3_1, or a ggml type gguf-py quantizes (Q8_0, Q4_0)."""
    if qtype in BITS:
        return quantize(w, qtype)
    blocks = gguf.quants.quantize(np.ascontiguousarray(w.float().numpy()), gguf.GGMLQuantizationType(qtype))
    return torch.from_numpy(np.ascontiguousarray(blocks).view(np.uint8).reshape(w.shape[0], -1))


def quantize(w: torch.Tensor, qtype: int) -> torch.Tensor:  # [N, K] fp32 -> [N, K/32 * bytes] uint8
    """Blocks of `qtype` (Q2_1 or Q3_1) for the rows of `w`; K must be a multiple of 32."""
    if qtype not in BITS:
        raise ValueError(f"unknown low-bit type {qtype}")
    n, k = w.shape
    if k % QK:
        raise ValueError(f"K = {k} is not a multiple of {QK}")
    out = torch.empty(n, row_bytes(qtype, k), dtype=torch.uint8)
    for r0 in range(0, n, _CHUNK):
        q, d, m = _fit(w[r0:r0 + _CHUNK].float().reshape(-1, k // QK, QK), BITS[qtype])
        out[r0:r0 + _CHUNK] = _pack(q, d, m, qtype).reshape(-1, out.shape[1])
    return out


def dequantize(blocks: torch.Tensor, qtype: int, k: int) -> torch.Tensor:  # [N, row bytes] -> [N, K] fp32
    """The weights the kernels decode from these blocks: d * q + m, rounded as they round it."""
    b = blocks.reshape(blocks.shape[0], k // QK, BLOCK_BYTES[qtype])  # [N, G, bytes]
    d = b[..., 0:2].contiguous().view(torch.float16).float()  # [N, G, 1]
    m = b[..., 2:4].contiguous().view(torch.float16).float()
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8).repeat_interleave(8)  # [32]: 2 (j // 8)
    q = (b[..., 4 + torch.arange(QK) % 8] >> shifts) & 3  # [N, G, 32]
    if qtype == Q3_1:
        third = (b[..., 12 + torch.arange(QK) // 8] >> (torch.arange(QK, dtype=torch.uint8) % 8)) & 1
        q = q | (third << 2)
    return (d * q.float() + m).reshape(blocks.shape[0], k)


def _fit(g: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per block of 32 ([R, G, 32]): q [R, G, 32] uint8, d and m [R, G, 1] fp16, the clipped range of least
    squared error (d and m rounded to fp16 before q is chosen, so the error is the decoded one)."""
    levels = (1 << bits) - 1
    lo0, hi0 = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    span = hi0 - lo0
    best_err = torch.full_like(lo0, float("inf"))
    best_q = torch.zeros(g.shape, dtype=torch.uint8)
    best_d, best_m = torch.zeros_like(lo0), torch.zeros_like(lo0)
    for a in _CLIPS:
        for b in _CLIPS:
            m = (lo0 + a * span).half().float()
            d = ((hi0 - b * span - m) / levels).clamp_min(0).half().float()
            inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
            q = ((g - m) * inv).round_().clamp_(0, levels)
            err = (d * q + m - g).square_().sum(-1, keepdim=True)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_q = torch.where(better, q.to(torch.uint8), best_q)
            best_d, best_m = torch.where(better, d, best_d), torch.where(better, m, best_m)
    return best_q, best_d.half(), best_m.half()


def _pack(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor, qtype: int) -> torch.Tensor:  # -> [R, G, bytes]
    crumbs = (q & 3).reshape(*q.shape[:-1], 4, 8)  # [R, G, 4, 8]: weight 8v + l
    low = crumbs[..., 0, :] | crumbs[..., 1, :] << 2 | crumbs[..., 2, :] << 4 | crumbs[..., 3, :] << 6  # [R, G, 8]
    parts = [d.view(torch.uint8), m.view(torch.uint8), low]  # fp16 as 2 bytes each
    if qtype == Q3_1:
        third = (q >> 2 & 1).reshape(*q.shape[:-1], 4, 8)  # [R, G, 4, 8]
        parts.append((third << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8))  # bit l: weight 8v + l
    return torch.cat(parts, dim=-1)
