"""The one place that knows HF decoder internals: where each family keeps its weights, norms and RoPE.

The runner owns the layer loop (runner.py) and computes every layer with the backend's five ops. An
adapter turns one HF model into what that loop reads: fused projections (q|k|v and gate|up), the
effective norm weights, the embedding and RoPE tables (the HF model's own modules compute those, so
RoPE scaling variants carry over), and the attention scale. Two families are covered:
  * Llama-style pre-norm blocks (Llama, Mistral, Qwen2, Qwen3, SmolLM2): h += attn(norm(h)); h += mlp(norm(h))
  * Gemma 3 sandwich-norm blocks with per-layer-type RoPE and sliding-window layers.
A config field the loop does not reproduce is refused at load (`check_supported`), naming the field.
"""
from __future__ import annotations

import torch
from torch import nn

from casspec.errors import InvalidRequestError
from casspec.runtime.weights import LayerWeights, ModelWeights, make_proj

LLAMA_FAMILY = {"llama", "mistral", "qwen2", "qwen3"}
GEMMA3_FAMILY = {"gemma3_text", "gemma3"}
FULL_ATTENTION, SLIDING_ATTENTION = "full_attention", "sliding_attention"
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


class UnsupportedModelError(InvalidRequestError):
    """The model's config asks for something the runtime does not compute."""


class LlamaAdapter:
    """Adapter for Llama-style decoder stacks."""

    norm_offset = 0.0  # effective RMSNorm weight = offset + w (Gemma: 1 + w)

    def __init__(self, model: nn.Module) -> None:
        self.config = cfg = getattr(model.config, "text_config", None) or model.config
        self.base = model.model
        self.lm_head = model.lm_head
        self.layers = list(self.base.layers)
        self.num_layers = len(self.layers)
        check_supported(cfg, self.layers)
        attn = self.layers[0].self_attn
        self.head_dim: int = attn.head_dim
        self.num_heads: int = attn.q_proj.out_features // attn.head_dim
        self.num_kv_heads: int = attn.k_proj.out_features // attn.head_dim
        self.vocab_size: int = self.lm_head.out_features
        self.scaling: float = float(attn.scaling)
        self.eps: float = float(getattr(cfg, "rms_norm_eps", 1e-6))
        self.act: str = ACTIVATIONS[_activation(cfg)]
        self.sliding_window: int | None = getattr(cfg, "sliding_window", None)
        self.layer_types: list[str] = list(getattr(cfg, "layer_types", None) or self._default_layer_types())
        self.final_softcap: float | None = getattr(cfg, "final_logit_softcapping", None)

    def _default_layer_types(self) -> list[str]:
        """Without `layer_types`, a set sliding window applies to every layer (Mistral)."""
        kind = SLIDING_ATTENTION if self.sliding_window else FULL_ATTENTION
        return [kind] * self.num_layers

    def window(self, layer_type: str) -> int | None:
        """Sliding window of a layer type (None = full attention)."""
        return self.sliding_window if layer_type == SLIDING_ATTENTION else None

    # ---- weights --------------------------------------------------------------------------------
    def norm(self, module: nn.Module) -> torch.Tensor:
        return (module.weight.detach().float() + self.norm_offset).contiguous()

    def layer_weights(self, layer: nn.Module, tile: bool) -> LayerWeights:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        return LayerWeights(
            qkv=make_proj([m.weight for m in qkv], [m.bias for m in qkv], tile=tile),
            o=make_proj([attn.o_proj.weight], [attn.o_proj.bias], tile=tile),
            gate_up=make_proj([mlp.gate_proj.weight, mlp.up_proj.weight], [mlp.gate_proj.bias, mlp.up_proj.bias],
                              glu=self.act, tile=tile),
            down=make_proj([mlp.down_proj.weight], [mlp.down_proj.bias], tile=tile),
            attn_norm=self.norm(layer.input_layernorm),
            mlp_norm=self.norm(self._pre_mlp_norm(layer)),
            q_norm=self.norm(attn.q_norm) if hasattr(attn, "q_norm") else None,
            k_norm=self.norm(attn.k_norm) if hasattr(attn, "k_norm") else None,
        )

    def _pre_mlp_norm(self, layer: nn.Module) -> nn.Module:
        return layer.post_attention_layernorm

    def weights(self, tile: bool) -> ModelWeights:
        """fp32 weights of the whole stack; `tile` adds the kernels' layout."""
        layers = [self.layer_weights(layer, tile) for layer in self.layers]
        head = make_proj([self.lm_head.weight], [self.lm_head.bias], tile=tile)
        return ModelWeights(layers, head, self.norm(self.base.norm))

    # ---- per forward ----------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:  # [M] -> [M, d]
        return self.base.embed_tokens(input_ids)

    def rope(self, h: torch.Tensor, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """cos, sin [M, D/2] per layer type, from the HF model's own rotary module."""
        cos, sin = self.base.rotary_emb(h[None], positions[None])
        table = _half(cos, sin)
        return {t: table for t in set(self.layer_types)}

    def softcap(self, logits: torch.Tensor) -> torch.Tensor:
        cap = self.final_softcap
        return torch.tanh(logits / cap) * cap if cap else logits


class Gemma3Adapter(LlamaAdapter):
    """Gemma 3: scaled embeddings (inside embed_tokens), (1 + w) norms, sandwich norms, local/global RoPE."""

    norm_offset = 1.0

    def layer_weights(self, layer: nn.Module, tile: bool) -> LayerWeights:
        lw = super().layer_weights(layer, tile)
        lw.post_attn_norm = self.norm(layer.post_attention_layernorm)
        lw.post_mlp_norm = self.norm(layer.post_feedforward_layernorm)
        return lw

    def _pre_mlp_norm(self, layer: nn.Module) -> nn.Module:
        return layer.pre_feedforward_layernorm

    def rope(self, h: torch.Tensor, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {t: _half(*self.base.rotary_emb(h[None], positions[None], t)) for t in set(self.layer_types)}


def _half(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's [1, M, D] tables repeat their first half; the ops take [M, D/2] fp32."""
    half = cos.shape[-1] // 2
    return cos[0, :, :half].float().contiguous(), sin[0, :, :half].float().contiguous()


def _activation(cfg: object) -> str:
    return getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", "silu")


def check_supported(cfg: object, layers: list[nn.Module]) -> None:
    """Refuse, naming the field, any config setting the runner's layer loop would silently ignore."""
    def refuse(field: str, value: object, why: str) -> None:
        raise UnsupportedModelError(f"unsupported model config: {field}={value!r} ({why})")

    if getattr(cfg, "attn_logit_softcapping", None):
        refuse("attn_logit_softcapping", cfg.attn_logit_softcapping, "attention soft-capping is not implemented")
    if _activation(cfg) not in ACTIVATIONS:
        refuse("hidden_act", _activation(cfg), f"supported: {sorted(ACTIVATIONS)}")
    types = getattr(cfg, "layer_types", None)
    if types is not None and set(types) - {FULL_ATTENTION, SLIDING_ATTENTION}:
        refuse("layer_types", sorted(set(types)), f"supported: {FULL_ATTENTION}, {SLIDING_ATTENTION}")
    if types is not None and SLIDING_ATTENTION in types and not getattr(cfg, "sliding_window", None):
        refuse("sliding_window", None, "layer_types has sliding layers but no window is set")
    if getattr(cfg, "use_bidirectional_attention", False):
        refuse("use_bidirectional_attention", True, "only causal decoders are supported")
    if getattr(cfg, "pretraining_tp", 1) not in (1, None):
        refuse("pretraining_tp", cfg.pretraining_tp, "split projections are not supported")
    attn, mlp = layers[0].self_attn, layers[0].mlp
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        if not isinstance(getattr(attn, name, None), nn.Linear):
            refuse(f"self_attn.{name}", type(getattr(attn, name, None)).__name__, "expected nn.Linear")
    for name in ("gate_proj", "up_proj", "down_proj"):
        if not isinstance(getattr(mlp, name, None), nn.Linear):
            refuse(f"mlp.{name}", type(getattr(mlp, name, None)).__name__, "expected a gated MLP of nn.Linear")


def make_adapter(model: nn.Module) -> LlamaAdapter:
    """Pick the adapter for an HF causal LM, or fail with the list of supported families."""
    kind = getattr(model.config, "model_type", "")
    if kind in GEMMA3_FAMILY:
        return Gemma3Adapter(model)
    if kind in LLAMA_FAMILY:
        return LlamaAdapter(model)
    raise UnsupportedModelError(f"unsupported architecture {kind!r}: casspec supports "
                                f"{sorted(LLAMA_FAMILY | GEMMA3_FAMILY)}")
