"""The one place that knows HF decoder internals: how to embed, rotate, run each sub-layer and the head.

The runner owns the layer loop and calls these per sub-layer, so layer sparsity can skip attention
and MLP independently. Two families are covered:
  * Llama-style pre-norm blocks (Llama, Mistral, Qwen2, Qwen3, SmolLM2): h += attn(norm(h)); h += mlp(norm(h))
  * Gemma 3 sandwich-norm blocks with per-layer-type RoPE and sliding-window layers.
"""
from __future__ import annotations

import torch
from torch import nn

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
        out, _ = layer.self_attn(hidden_states=layer.input_layernorm(h), position_embeddings=rope,
                                 attention_mask=mask, past_key_values=cache)
        return h + out

    def mlp(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def head(self, h: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        return lm_head(self.base.norm(h))


class Gemma3Adapter(LlamaAdapter):
    """Adapter for Gemma 3: scaled embeddings (inside embed_tokens), sandwich norms, local/global RoPE."""

    def rope(self, h: torch.Tensor, position_ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {t: self.base.rotary_emb(h, position_ids, t) for t in set(self.layer_types)}

    def attn(self, layer: nn.Module, h: torch.Tensor, rope: tuple, mask: torch.Tensor | None, cache: object) -> torch.Tensor:
        out, _ = layer.self_attn(hidden_states=layer.input_layernorm(h), position_embeddings=rope,
                                 attention_mask=mask, past_key_values=cache)
        return h + layer.post_attention_layernorm(out)

    def mlp(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return h + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))

    def head(self, h: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        logits = lm_head(self.base.norm(h))
        cap = getattr(self.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits


def make_adapter(model: nn.Module) -> LlamaAdapter:
    """Pick the adapter for an HF causal LM, or fail with the list of supported families."""
    kind = getattr(model.config, "model_type", "")
    if kind in GEMMA3_FAMILY:
        return Gemma3Adapter(model)
    if kind in LLAMA_FAMILY:
        return LlamaAdapter(model)
    raise ValueError(f"unsupported architecture {kind!r}: casspec supports "
                     f"{sorted(LLAMA_FAMILY | GEMMA3_FAMILY)}")
