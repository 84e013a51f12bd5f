"""Int8 weights + dynamically quantized activations on real int8 kernels (fbgemm/x86 via torch.ao).

torch.ao's dynamic quantization is deprecated upstream in favour of torchao; it is what runs
fastest on this CPU (see README, "Quantization library"), so it stays behind this one function.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn


def quantize_int8(module: nn.Module) -> nn.Module:
    """Return `module` with every nn.Linear replaced by a dynamic int8 linear (in place)."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(module, nn.Linear):
            return quantize_dynamic(nn.Sequential(module), {nn.Linear}, dtype=torch.qint8, inplace=True)[0]
        return quantize_dynamic(module, {nn.Linear}, dtype=torch.qint8, inplace=True)
