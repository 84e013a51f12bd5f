"""The one place that knows HF decoder internals: how to embed, rotate, run each sub-layer and the head.

The runner owns the layer loop and calls these per sub-layer, so layer sparsity can skip attention
and MLP independently. Two families are covered:
  * Llama-style pre-norm blocks (Llama, Mistral, Qwen2, Qwen3, SmolLM2): h += attn(norm(h)); h += mlp(norm(h))
  * Gemma 3 sandwich-norm blocks with per-layer-type RoPE and sliding-window layers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

LLAMA_FAMILY = {"llama", "mistral", "qwen2", "qwen3"}
GEMMA3_FAMILY = {"gemma3_text", "gemma3"}
FULL_ATTENTION = "full_attention"


class LlamaAdapter:
    """Adapter for Llama-style decoder stacks."""

    def __init__(self, model: nn.Module) -> None:
        self.config = model.config
        self.base = model.model
        self.lm_head = model.lm_head
        self.layers = list(self.base.layers)
        self.num_layers = len(self.layers)
        cfg = self.config
        self.layer_types: list[str] = list(getattr(cfg, "layer_types", None) or [FULL_ATTENTION] * self.num_layers)
        self.sliding_window: int | None = getattr(cfg, "sliding_window", None)
        attn = self.layers[0].self_attn
        self.head_dim: int = attn.head_dim
        self.num_kv_heads: int = attn.k_proj.out_features // attn.head_dim
        self.vocab_size: int = self.lm_head.out_features

    def window(self, layer_type: str) -> int | None:
        """Sliding window of a layer type (None = full attention)."""
        return self.sliding_window if layer_type == "sliding_attention" else None

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.base.embed_tokens(input_ids)  # [1, q, d]

    def rope(self, h: torch.Tensor, position_ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        cos_sin = self.base.rotary_emb(h, position_ids)
        return {t: cos_sin for t in set(self.layer_types)}

    def attn(self, layer: nn.Module, h: torch.Tensor, rope: tuple, mask: torch.Tensor | None, cache: object) -> torch.Tensor:
        return h + self.attention(layer.self_attn, layer.input_layernorm(h), rope, mask, cache)

    def attention(self, attn: nn.Module, x: torch.Tensor, rope: tuple, mask: torch.Tensor | None,
                  cache: object) -> torch.Tensor:  # x: [1, q, d] -> [1, q, d]
        """Self-attention through the HF module's own projections and norms, with one GQA-aware SDPA call.

        The HF modules route masked multi-token queries through `repeat_kv` and SDPA's math kernel;
        calling SDPA directly with `enable_gqa` keeps the CPU flash kernel for tree masks too.
        """
        q_len, d = x.shape[1], self.head_dim
        if hasattr(attn, "qkv_proj"):  # fused copy (see fuse_projections)
            q, k, v = attn.qkv_proj(x).split(attn.qkv_sizes, dim=-1)
        else:
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        q = q.view(1, q_len, -1, d)  # [1, q, H, D]
        k = k.view(1, q_len, -1, d)  # [1, q, H_kv, D]
        v = v.view(1, q_len, -1, d).transpose(1, 2)  # [1, H_kv, q, D]
        if hasattr(attn, "q_norm"):  # Qwen3 / Gemma 3 per-head norms
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), *rope)
        k, v = cache.update(k, v, attn.layer_idx)  # [1, H_kv, kv_len, D]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling,
                                             enable_gqa=k.shape[1] != q.shape[1])  # [1, H, q, D]
        return attn.o_proj(out.transpose(1, 2).reshape(1, q_len, -1))

    def mlp(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return h + self.gated_mlp(layer.mlp, layer.post_attention_layernorm(h))

    @staticmethod
    def gated_mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:  # [1, q, d] -> [1, q, d]
        if not hasattr(mlp, "gate_up_proj"):
            return mlp(x)
        gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)  # [1, q, ffn] each
        return mlp.down_proj(mlp.act_fn(gate) * up)

    @staticmethod
    def fuse_projections(layer: nn.Module) -> None:
        """In a private copy of a layer: one q|k|v and one gate|up Linear (fewer, larger int8 matmuls)."""
        attn, mlp = layer.self_attn, layer.mlp
        parts = [attn.q_proj, attn.k_proj, attn.v_proj]
        attn.qkv_proj, attn.qkv_sizes = _concat_linears(parts), [p.out_features for p in parts]
        mlp.gate_up_proj = _concat_linears([mlp.gate_proj, mlp.up_proj])
        del attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj

    def head(self, h: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        return lm_head(self.base.norm(h))


class Gemma3Adapter(LlamaAdapter):
    """Adapter for Gemma 3: scaled embeddings (inside embed_tokens), sandwich norms, local/global RoPE."""

    def rope(self, h: torch.Tensor, position_ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {t: self.base.rotary_emb(h, position_ids, t) for t in set(self.layer_types)}

    def attn(self, layer: nn.Module, h: torch.Tensor, rope: tuple, mask: torch.Tensor | None, cache: object) -> torch.Tensor:
        out = self.attention(layer.self_attn, layer.input_layernorm(h), rope, mask, cache)
        return h + layer.post_attention_layernorm(out)

    def mlp(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return h + layer.post_feedforward_layernorm(self.gated_mlp(layer.mlp, layer.pre_feedforward_layernorm(h)))

    def head(self, h: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        logits = lm_head(self.base.norm(h))
        cap = getattr(self.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits


def _concat_linears(parts: list[nn.Linear]) -> nn.Linear:
    """One Linear computing the outputs of `parts` side by side (weights concatenated, a copy)."""
    bias = parts[0].bias is not None
    out = nn.Linear(parts[0].in_features, sum(p.out_features for p in parts), bias=bias)
    with torch.no_grad():
        out.weight.copy_(torch.cat([p.weight for p in parts]))
        if bias:
            out.bias.copy_(torch.cat([p.bias for p in parts]))
    return out.to(parts[0].weight.device, parts[0].weight.dtype)


def make_adapter(model: nn.Module) -> LlamaAdapter:
    """Pick the adapter for an HF causal LM, or fail with the list of supported families."""
    kind = getattr(model.config, "model_type", "")
    if kind in GEMMA3_FAMILY:
        return Gemma3Adapter(model)
    if kind in LLAMA_FAMILY:
        return LlamaAdapter(model)
    raise ValueError(f"unsupported architecture {kind!r}: casspec supports "
                     f"{sorted(LLAMA_FAMILY | GEMMA3_FAMILY)}")
