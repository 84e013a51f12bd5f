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

from typing import Any

import torch
from torch import nn

from casspec.errors import InvalidRequestError
from casspec.runtime.sources import GGUFSource, ModuleSource
from casspec.runtime.weights import LayerWeights, ModelWeights, Proj, make_proj

LLAMA_FAMILY = {"llama", "mistral", "qwen2", "qwen3"}
GEMMA3_FAMILY = {"gemma3_text", "gemma3"}
FULL_ATTENTION, SLIDING_ATTENTION = "full_attention", "sliding_attention"
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
# RoPE variants whose tables HF's rotary module computes in the [M, D/2] cos/sin form the ops take
ROPE_TYPES = {"default", "linear", "dynamic", "yarn", "longrope", "llama3"}


class UnsupportedModelError(InvalidRequestError):
    """The model's config asks for something the runtime does not compute."""


class LlamaAdapter:
    """Adapter for Llama-style decoder stacks."""

    norm_offset = 0.0  # effective RMSNorm weight = offset + w (Gemma: 1 + w)
    pre_mlp_norm = "post_attention_layernorm"

    def __init__(self, model: nn.Module, source: ModuleSource | GGUFSource | None = None) -> None:
        hf: Any = model  # an HF causal LM of any family: `config`, `model` (the stack), `lm_head` are duck-typed
        self.config = cfg = getattr(hf.config, "text_config", None) or hf.config
        self.base = hf.model
        self.lm_head = hf.lm_head
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
        self.source = source or ModuleSource(model)
        names = {id(m): n for n, m in model.named_modules()}
        self.prefix, self.head_name = names[id(self.base)], names[id(self.lm_head)]  # "model", "lm_head"
        self.rotary = _cpu_rotary(self.base.rotary_emb)
        self._rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # layer type -> cos, sin [P, D/2]
        self._rope_len, self._rope_dtype = 0, torch.float32
        self.embed_rows: int = self._embed_rows()
        self._check_shapes()

    def _embed_rows(self) -> int:
        """Rows of the input embedding (the GGUF file's own tensor when it holds the weights)."""
        if isinstance(self.source, GGUFSource):
            return int(self.source.linear("model.embed_tokens")[0].shape[0])
        return int(self.base.embed_tokens.num_embeddings)

    def _check_shapes(self) -> None:
        """Refuse what only shows in the built modules: RoPE tables narrower than the head (a partial
        rotary variant), an odd head size, a head scoring tokens the embedding has no row for."""
        if self.head_dim % 2:
            raise UnsupportedModelError(f"unsupported model config: head_dim={self.head_dim} "
                                        "(RoPE needs an even head size)")
        for kind, (cos, _) in self.rope(torch.zeros(1, 1), torch.zeros(1, dtype=torch.long)).items():
            if cos.shape[-1] * 2 != self.head_dim:
                raise UnsupportedModelError(
                    f"unsupported model config: partial_rotary_factor (RoPE of {kind} layers covers "
                    f"{cos.shape[-1] * 2} of {self.head_dim} head dimensions; only full rotary is implemented)")
        if self.vocab_size > self.embed_rows:
            raise UnsupportedModelError(f"unsupported model: the output head scores {self.vocab_size} tokens but the "
                                        f"input embedding has {self.embed_rows} rows")

    def _default_layer_types(self) -> list[str]:
        """Without `layer_types`, a set sliding window applies to every layer (Mistral)."""
        kind = SLIDING_ATTENTION if self.sliding_window else FULL_ATTENTION
        return [kind] * self.num_layers

    def window(self, layer_type: str) -> int | None:
        """Sliding window of a layer type (None = full attention)."""
        return self.sliding_window if layer_type == SLIDING_ATTENTION else None

    # ---- weights --------------------------------------------------------------------------------
    def norm(self, name: str) -> torch.Tensor:
        return (self.source.vector(name).detach().float() + self.norm_offset).contiguous()

    def proj(self, names: list[str], tile: bool, glu: str | None = None) -> Proj:
        weights, biases = zip(*(self.source.linear(n) for n in names))
        return make_proj(list(weights), list(biases), glu=glu, tile=tile)

    def projection_modules(self, i: int) -> dict[str, list[str]]:
        """Layer i's fused projections ("qkv", "o", "gate_up", "down") and the HF linear modules of each."""
        at, mlp = f"{self.prefix}.layers.{i}.self_attn", f"{self.prefix}.layers.{i}.mlp"
        return {"qkv": [f"{at}.q_proj", f"{at}.k_proj", f"{at}.v_proj"], "o": [f"{at}.o_proj"],
                "gate_up": [f"{mlp}.gate_proj", f"{mlp}.up_proj"], "down": [f"{mlp}.down_proj"]}

    def module_keys(self) -> dict[str, str]:
        """HF linear module name -> the key of the projection it is part of (ModelWeights.named_projections)."""
        keys = {self.head_name: "head"}
        for i in range(self.num_layers):
            keys.update({m: f"{i}.{key}" for key, mods in self.projection_modules(i).items() for m in mods})
        return keys

    def layer_weights(self, i: int, tile: bool) -> LayerWeights:
        at = f"{self.prefix}.layers.{i}.self_attn"
        mods = self.projection_modules(i)
        return LayerWeights(
            qkv=self.proj(mods["qkv"], tile),
            o=self.proj(mods["o"], tile),
            gate_up=self.proj(mods["gate_up"], tile, glu=self.act),
            down=self.proj(mods["down"], tile),
            attn_norm=self.norm(f"{self.prefix}.layers.{i}.input_layernorm"),
            mlp_norm=self.norm(f"{self.prefix}.layers.{i}.{self.pre_mlp_norm}"),
            q_norm=self.norm(f"{at}.q_norm") if self.source.has(f"{at}.q_norm") else None,
            k_norm=self.norm(f"{at}.k_norm") if self.source.has(f"{at}.k_norm") else None,
        )

    def weights(self, tile: bool) -> ModelWeights:
        """The whole stack's weights (fp32 parameters, or blocks as they ship); `tile` adds the kernels' layout."""
        layers = [self.layer_weights(i, tile) for i in range(self.num_layers)]
        return ModelWeights(layers, self.proj([self.head_name], tile), self.norm(f"{self.prefix}.norm"))

    # ---- per forward ----------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:  # [M] -> [M, d] fp32
        if isinstance(self.source, GGUFSource):  # HF's scaled embedding: rows * float32(scale)
            scale = getattr(self.base.embed_tokens, "scalar_embed_scale", None)
            rows = self.source.embed_rows(input_ids)
            return rows * torch.tensor(scale) if scale is not None else rows
        return self.base.embed_tokens(input_ids).float()

    def rope(self, h: torch.Tensor, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """cos, sin [M, D/2] per layer type: rows of tables the HF model's own rotary module computed for
        positions 0 .. P-1, P doubling on demand. The module computes each position on its own (one product
        per frequency, then cos / sin), so a row is what it gives for that position alone; a lookup costs a
        few microseconds where the module costs 20-60 a forward."""
        need = int(positions.max()) + 1 if positions.numel() else 0
        if need > self._rope_len or h.dtype != self._rope_dtype:  # (the module rounds its tables to h's dtype)
            self._rope_len, self._rope_dtype = max(need, 2 * self._rope_len, 1024), h.dtype
            self._rope = self.rope_tables(h, torch.arange(self._rope_len, device=positions.device))
        return {t: (cos[positions], sin[positions]) for t, (cos, sin) in self._rope.items()}

    def rope_tables(self, h: torch.Tensor, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """cos, sin [M, D/2] per layer type, from the HF model's own rotary module."""
        table = _half(*self.rotary(h[None], positions[None]))
        return {t: table for t in set(self.layer_types)}

    def softcap(self, logits: torch.Tensor) -> torch.Tensor:
        cap = self.final_softcap
        return torch.tanh(logits / cap) * cap if cap else logits


class Gemma3Adapter(LlamaAdapter):
    """Gemma 3: scaled embeddings (inside embed_tokens), (1 + w) norms, sandwich norms, local/global RoPE."""

    norm_offset = 1.0

    pre_mlp_norm = "pre_feedforward_layernorm"

    def layer_weights(self, i: int, tile: bool) -> LayerWeights:
        lw = super().layer_weights(i, tile)
        lw.post_attn_norm = self.norm(f"{self.prefix}.layers.{i}.post_attention_layernorm")
        lw.post_mlp_norm = self.norm(f"{self.prefix}.layers.{i}.post_feedforward_layernorm")
        return lw

    def rope_tables(self, h: torch.Tensor, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {t: _half(*self.rotary(h[None], positions[None], t)) for t in set(self.layer_types)}


def _cpu_rotary(rotary: nn.Module) -> nn.Module:
    """The model's rotary module, rebuilt on the CPU when the model is a skeleton on the meta device."""
    if next(iter(rotary.buffers()), torch.empty(0)).device.type != "meta":
        return rotary
    with torch.device("cpu"):
        return type(rotary)(rotary.config)


def _half(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's [1, M, D] tables repeat their first half; the ops take [M, D/2] fp32."""
    half = cos.shape[-1] // 2
    return cos[0, :, :half].float().contiguous(), sin[0, :, :half].float().contiguous()


def _activation(cfg: object) -> str:
    return getattr(cfg, "hidden_activation", "") or getattr(cfg, "hidden_act", "silu")  # ("": unset, as None)


def check_supported(cfg: object, layers: list[nn.Module]) -> None:
    """Refuse, naming the field, any config setting the runner's layer loop would silently ignore."""
    def refuse(field: str, value: object, why: str) -> None:
        raise UnsupportedModelError(f"unsupported model config: {field}={value!r} ({why})")

    softcap = getattr(cfg, "attn_logit_softcapping", None)
    if softcap:
        refuse("attn_logit_softcapping", softcap, "attention soft-capping is not implemented")
    if _activation(cfg) not in ACTIVATIONS:
        refuse("hidden_act", _activation(cfg), f"supported: {sorted(ACTIVATIONS)}")
    types = getattr(cfg, "layer_types", None)
    if types is not None and set(types) - {FULL_ATTENTION, SLIDING_ATTENTION}:
        refuse("layer_types", sorted(set(types)), f"supported: {FULL_ATTENTION}, {SLIDING_ATTENTION}")
    if types is not None and SLIDING_ATTENTION in types and not getattr(cfg, "sliding_window", None):
        refuse("sliding_window", None, "layer_types has sliding layers but no window is set")
    if getattr(cfg, "use_bidirectional_attention", False):
        refuse("use_bidirectional_attention", True, "only causal decoders are supported")
    tp = getattr(cfg, "pretraining_tp", 1)
    if tp not in (1, None):
        refuse("pretraining_tp", tp, "split projections are not supported")
    for field, params in _rope_parameters(cfg):
        factor = params.get("partial_rotary_factor", 1.0)
        if factor is not None and float(factor) != 1.0:
            refuse(f"{field}.partial_rotary_factor", factor, "only full rotary embeddings are implemented")
        kind = params.get("rope_type", params.get("type", "default"))  # "type": the older spelling
        if kind not in ROPE_TYPES:
            refuse(f"{field}.rope_type", kind, f"supported: {sorted(ROPE_TYPES)}")
        if params.get("mrope_section") is not None:
            refuse(f"{field}.mrope_section", params["mrope_section"], "multimodal RoPE is not implemented")
    for field in ("partial_rotary_factor", "rotary_pct"):  # older spellings outside the rope parameters
        value = getattr(cfg, field, None)
        if value is not None and float(value) != 1.0:
            refuse(field, value, "only full rotary embeddings are implemented")
    if getattr(cfg, "use_sliding_window", False) and not getattr(cfg, "sliding_window", None):
        refuse("sliding_window", None, "use_sliding_window is set but no window is")
    chunk = getattr(cfg, "attention_chunk_size", None)
    if chunk is not None:
        refuse("attention_chunk_size", chunk, "chunked attention is not implemented")
    for field in ("logits_scaling", "embedding_multiplier", "residual_multiplier", "attention_multiplier"):
        if getattr(cfg, field, None) not in (None, 1, 1.0):  # Granite-style scalings, ignored by the loop
            refuse(field, getattr(cfg, field), "not implemented by the runtime's layer loop")
    attn, mlp = layers[0].self_attn, layers[0].mlp
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        if not isinstance(getattr(attn, name, None), nn.Linear):
            refuse(f"self_attn.{name}", type(getattr(attn, name, None)).__name__, "expected nn.Linear")
    for name in ("gate_proj", "up_proj", "down_proj"):
        if not isinstance(getattr(mlp, name, None), nn.Linear):
            refuse(f"mlp.{name}", type(getattr(mlp, name, None)).__name__, "expected a gated MLP of nn.Linear")


def _rope_parameters(cfg: object) -> list[tuple[str, dict]]:
    """(field name, RoPE parameters) of a config: transformers 5's `rope_parameters` (per layer type for
    Gemma 3), or the older `rope_scaling`."""
    for field in ("rope_parameters", "rope_scaling"):
        params = getattr(cfg, field, None)
        if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
            return [(f"{field}[{k!r}]", v) for k, v in params.items()]
        if isinstance(params, dict):
            return [(field, params)]
    return []


def check_tokenizer(tokenizer: object, embed_rows: int) -> None:
    """Refuse a tokenizer whose base vocabulary has more ids than the embedding has rows (ordinary text
    would index past the embedding). Added tokens past the rows fail only the prompts that hold them, at
    submit (`Engine.start`), so a checkpoint with a few unused added tokens still loads."""
    base = getattr(tokenizer, "vocab_size", None)
    if isinstance(base, int) and base > embed_rows:
        raise UnsupportedModelError(f"the tokenizer has {base} token ids but the model's embedding has only "
                                    f"{embed_rows} rows: they do not belong together")


def check_prompt_ids(ids: list[int], embed_rows: int) -> None:
    """Refuse, before any forward, a prompt holding a token id the embedding has no row for."""
    if ids and not 0 <= min(ids) <= max(ids) < embed_rows:
        bad = next(t for t in ids if not 0 <= t < embed_rows)
        raise InvalidRequestError(f"prompt token id {bad} is outside the model's vocabulary "
                                  f"(its embedding has {embed_rows} rows, ids 0..{embed_rows - 1})")


def make_adapter(model: nn.Module, source: ModuleSource | GGUFSource | None = None) -> LlamaAdapter:
    """Pick the adapter for an HF causal LM (its weights from `source`, default its own modules), or fail
    with the list of supported families."""
    kind = getattr(model.config, "model_type", "")
    if kind in GEMMA3_FAMILY:
        return Gemma3Adapter(model, source)
    if kind in LLAMA_FAMILY:
        return LlamaAdapter(model, source)
    raise UnsupportedModelError(f"unsupported architecture {kind!r}: casspec supports "
                                f"{sorted(LLAMA_FAMILY | GEMMA3_FAMILY)}")
