"""Shape-aware fp32 linear for CPU: the matmul layout that is fastest for the number of rows.

Measured on the project's AVX2 CPU (research/feasibility.md §3b): MKL's sgemm path for 2 <= M <= 32 rows
costs about 2x its gemv path, so `F.linear` makes verifying 2..16 tokens ~1.7x the cost of one.
`(W @ x.T).T` keeps it near 1.15x, and `x @ W.T.contiguous()` halves the cost of a single row for
large heads. On other devices `F.linear` is kept.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class FastLinear(nn.Module):
    """A Linear sharing the original weight, plus a transposed contiguous copy for single rows."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight  # [N, K], shared with the HF model
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_t", linear.weight.detach().t().contiguous(), persistent=False)  # [K, N]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., K]
        rows = x.numel() // x.shape[-1]
        if rows == 1:
            y = x @ self.weight_t
        elif rows <= 64:
            y = (self.weight @ x.reshape(rows, -1).t()).t().reshape(*x.shape[:-1], self.out_features)
        else:
            return F.linear(x, self.weight, self.bias)
        return y + self.bias if self.bias is not None else y


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
