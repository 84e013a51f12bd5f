"""Shape-aware fp32 linear for CPU: oneDNN with a pre-packed weight, flat in the number of rows.

Measured on the project's AVX2 CPU (2 threads, µs, `lm_head` 576x49152 / MLP 576x1536):

| rows            | 1         | 2          | 4          | 8          | 16         |
|-----------------|-----------|------------|------------|------------|------------|
| `F.linear`      | 9436 / 86 | 24312 / 162| 25948 / 222| 24706 / 275| 28702 / 368|
| oneDNN, packed  | 5536 / 65 | 6794 / 76  | 7552 / 116 | 8791 / 151 | 11554 / 259|

MKL's sgemm path for 2..32 rows costs ~2x its gemv path, which makes verifying a few tokens cost
1.5x one; oneDNN's packed-weight kernel (the one Inductor uses on CPU) keeps it near 1.1x. The packed
weight is a copy (the HF weight stays shared for everything else). Without oneDNN, `F.linear` is kept.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

PACK_ROWS_HINT = 16  # oneDNN packs the weight for this batch size; 8..64 all time alike
MAX_FAST_ROWS = 64  # longer inputs (prefill) go through F.linear


def fast_linear_available() -> bool:
    return torch.backends.mkldnn.is_available()


class FastLinear(nn.Module):
    """A Linear sharing the original weight, plus a oneDNN-packed copy used for short inputs."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight  # [N, K], shared with the HF model
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), PACK_ROWS_HINT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., N]
        if x.numel() // x.shape[-1] > MAX_FAST_ROWS:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def fast_copy(modules: list[nn.Module]) -> list[nn.Module]:
    """Copies of `modules` that share every parameter, with each nn.Linear made a FastLinear."""
    memo: dict[int, object] = {}
    for m in modules:
        for p in m.parameters():
            memo[id(p)] = p
    out = [copy.deepcopy(m, memo) for m in modules]
    for m in out:
        _swap_linears(m)
    return out


def _swap_linears(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, FastLinear(child))
        else:
            _swap_linears(child)
