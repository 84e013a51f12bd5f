"""Int8 weights + dynamically quantized activations on real int8 kernels (fbgemm/x86 via torch.ao).

torch.ao's dynamic quantization is deprecated upstream in favour of torchao; it is what runs
fastest on this CPU (see README, "Quantization library"), so it stays behind this one function.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn


def quantize_int8(module: nn.Module, per_channel: bool = True) -> nn.Module:
    """Return `module` with every nn.Linear replaced by a dynamic int8 linear (in place).

    Per-channel weight scales (one per output row) keep fused q|k|v and gate|up matrices as accurate
    as their parts; per-tensor scales would let the largest part set everyone's step size.
    """
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    spec = {nn.Linear: per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(module, nn.Linear):
            return quantize_dynamic(nn.Sequential(module), spec, dtype=torch.qint8, inplace=True)[0]
        return quantize_dynamic(module, spec, dtype=torch.qint8, inplace=True)
