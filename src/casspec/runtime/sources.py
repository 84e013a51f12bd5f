"""Where an adapter reads a model's tensors: the HF modules themselves, or a GGUF file's blocks.

Both answer by HF module name ("model.layers.3.self_attn.q_proj"), so the adapter walks one structure:
  ModuleSource  the parameters of a loaded HF model (fp32, or bf16 / fp16 kept at 2 bytes a weight)
  GGUFSource    a memory-mapped GGUF file (gguf_file.py): projections, embedding and head stay in their
                ggml blocks; norms and biases are small fp32 vectors. Names map through gguf-py's tensor
                name map; llama.cpp's rotary row permutation of Q and K is undone on the rows of blocks,
                and Gemma's stored (1 + w) norms get transformers' `w - 1`, so every value is the one HF
                transformers' GGUF loader computes.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import gguf
import torch
from torch import nn

from casspec.runtime.gguf_file import GGUFFile, NativeTensor

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

Weight = torch.Tensor | NativeTensor


class ModuleSource:
    """Tensors of an HF model's own modules."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = dict(model.named_modules())

    def linear(self, name: str) -> tuple[Weight, torch.Tensor | None]:
        module = self.modules[name]
        return module.weight, module.bias

    def vector(self, name: str) -> torch.Tensor:
        return self.modules[name].weight

    def has(self, name: str) -> bool:
        return name in self.modules


class GGUFSource:
    """Tensors of a GGUF file under HF module names."""

    def __init__(self, file: GGUFFile, config: PretrainedConfig, num_layers: int) -> None:
        self.file = file
        archs = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
        if file.arch not in archs:
            raise ValueError(f"GGUF architecture {file.arch!r} is not known to gguf-py")
        self.names = gguf.get_tensor_name_map(archs[file.arch], num_layers)
        self.heads = (config.num_attention_heads, config.num_key_value_heads)
        self.permuted = file.arch == "llama"  # llama.cpp's converter interleaves Q/K rows for its RoPE

    def _name(self, name: str) -> str:
        if name == "lm_head" and "output.weight" not in self.file:
            name = "model.embed_tokens"  # tied embeddings
        mapped = self.names.get_name(name)
        if mapped is None or f"{mapped}.weight" not in self.file:
            raise KeyError(f"{self.file.path.name} has no tensor for {name!r}")
        return mapped

    def linear(self, name: str) -> tuple[Weight, torch.Tensor | None]:
        base = self._name(name)
        w = self.file[f"{base}.weight"]
        if self.permuted and base.endswith(("attn_q", "attn_k")):
            assert isinstance(w, NativeTensor)  # a 2-D weight (1-D tensors alone are torch tensors)
            w = _unpermute(w, self.heads[0] if base.endswith("attn_q") else self.heads[1])
        bias = self.file.tensors.get(f"{base}.bias")
        assert bias is None or isinstance(bias, torch.Tensor)  # 1-D: an fp32 torch tensor
        return w, bias

    def vector(self, name: str) -> torch.Tensor:
        base = self._name(name)
        v = self.file[f"{base}.weight"]
        assert isinstance(v, torch.Tensor)
        return v - 1 if self.file.arch.startswith("gemma") and "norm" in base else v

    def has(self, name: str) -> bool:
        mapped = self.names.get_name(name)
        return mapped is not None and f"{mapped}.weight" in self.file

    def dequantized_model(self, config: PretrainedConfig) -> PreTrainedModel:
        """An fp32 HF model of `config` holding this file's values (what transformers' GGUF loader makes,
        without parsing the metadata again): for calibrations that need autograd."""
        from transformers import AutoModelForCausalLM

        ref = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        with torch.no_grad():
            for name, module in ref.named_modules():
                if isinstance(module, nn.Linear) or name.endswith("embed_tokens"):
                    w, bias = self.linear(name)
                    module.weight.copy_(w.dequantize().reshape(module.weight.shape))
                    if bias is not None:
                        module.bias.copy_(bias)
                elif name.endswith("norm") and hasattr(module, "weight") and self.has(name):
                    module.weight.copy_(self.vector(name))
        return ref

    def embed_rows(self, ids: torch.Tensor) -> torch.Tensor:  # [M] -> [M, d] fp32
        w, _ = self.linear("model.embed_tokens")
        assert isinstance(w, NativeTensor)  # a 2-D weight (1-D tensors alone are torch tensors)
        return w.dequantize(ids.cpu())


def _unpermute(w: NativeTensor, heads: int) -> NativeTensor:
    """Undo llama.cpp's Q/K row interleaving (transformers' `_reverse_permute_weights`) on whole rows."""
    n, rb = w.blocks.shape
    rows = w.blocks.reshape(heads, n // heads // 2, 2, rb).transpose(1, 2).reshape(n, rb).contiguous()
    return NativeTensor(rows, w.qtype, w.shape)
