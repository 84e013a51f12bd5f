"""TargetRunner: owns the decoder-layer loop over the HF model's own modules.

One forward = embed -> RoPE -> for each layer: attention and MLP sub-layers as the ExecutionPlan says
-> final norm + head, reading and writing the shared StaticKVCache at explicit slots. Every drafter and
the verifier go through `forward`; the plan decides which weights (fp32 or int8 copy) and sub-layers run.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from casspec.target.adapter import LlamaAdapter, make_adapter
from casspec.target.fast_linear import fast_copy, fast_linear_available
from casspec.target.kv_cache import StaticKVCache
from casspec.target.plans import FULL, ExecutionPlan
from casspec.target.quant import quantize_int8


class TargetRunner:
    """Runs forwards of one HF causal LM under execution plans."""

    def __init__(self, model: nn.Module, fast_linear: bool | None = None) -> None:
        self.model = model.eval()
        self.adapter: LlamaAdapter = make_adapter(model)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self._int8: tuple[list[nn.Module], nn.Module] | None = None
        self._fp32 = (self.adapter.layers, self.adapter.lm_head)
        if fast_linear is None:
            fast_linear = self.device.type == "cpu" and self.dtype == torch.float32 and fast_linear_available()
        if fast_linear:
            *layers, head = fast_copy([*self.adapter.layers, self.adapter.lm_head])
            self._fp32 = (layers, head)

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers

    @property
    def vocab_size(self) -> int:
        return self.adapter.vocab_size

    def synchronize(self) -> None:
        """Wait for queued device work (for wall-clock timings of forwards on GPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def new_cache(self, capacity: int) -> StaticKVCache:
        a = self.adapter
        return StaticKVCache(a.num_layers, a.num_kv_heads, a.head_dim, capacity, self.dtype, self.device)

    def int8_modules(self) -> tuple[list[nn.Module], nn.Module]:
        """The int8 copy of the decoder layers and head (built once, on first use)."""
        if self._int8 is None:
            layers = copy.deepcopy(nn.ModuleList(self.adapter.layers))
            for layer in layers:
                self.adapter.fuse_projections(layer)
            head = copy.deepcopy(self.adapter.lm_head)  # untied copy: the embedding stays fp32
            self._int8 = (list(quantize_int8(layers)), quantize_int8(head))
        return self._int8

    def _modules(self, plan: ExecutionPlan) -> tuple[list[nn.Module], nn.Module]:
        return self.int8_modules() if plan.quantized else self._fp32

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [q]
        positions: torch.Tensor,  # [q] absolute positions
        slots: torch.Tensor,  # [q] cache slots written
        cache: StaticKVCache,
        plan: ExecutionPlan = FULL,
        allowed: torch.Tensor | None = None,  # [q, kv_len] bool; None = causal by slot
        key_positions: torch.Tensor | None = None,  # [kv_len]; None = slot index
        logits_rows: torch.Tensor | None = None,  # [r] rows needing logits; None = all
    ) -> torch.Tensor:  # [r, V] (or [0, V] if no rows)
        """One forward of `q` tokens under `plan`; returns logits for the requested rows."""
        a = self.adapter
        layers, lm_head = self._modules(plan)
        input_ids, positions, slots, allowed, key_positions, logits_rows = (
            None if t is None else t.to(self.device, non_blocking=True)
            for t in (input_ids, positions, slots, allowed, key_positions, logits_rows))
        cache.set_write_slots(slots)
        h = a.embed(input_ids[None])  # [1, q, d]
        rope = a.rope(h, positions[None])
        masks = self._masks(positions, slots, cache.kv_len, allowed, key_positions)
        for i, layer in enumerate(layers):
            if plan.exit_layer is not None and i >= plan.exit_layer:
                break
            kind = a.layer_types[i]
            if plan.runs_attn(i):
                h = a.attn(layer, h, rope[kind], masks[kind], cache)
            if plan.runs_mlp(i):
                h = a.mlp(layer, h)
        if logits_rows is not None:
            if logits_rows.numel() == 0:
                return h.new_empty(0, a.vocab_size)
            h = h[:, logits_rows]
        return a.head(h, lm_head)[0].float()

    def _masks(self, q_pos: torch.Tensor, slots: torch.Tensor, kv_len: int, allowed: torch.Tensor | None,
               k_pos: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
        """Additive masks [1, 1, q, kv_len] per layer type (None where every key is visible)."""
        if allowed is None:
            allowed = torch.arange(kv_len, device=slots.device)[None, :] <= slots[:, None]  # causal by slot
        if k_pos is None:
            k_pos = torch.arange(kv_len, device=slots.device)
        out: dict[str, torch.Tensor | None] = {}
        for kind in set(self.adapter.layer_types):
            window = self.adapter.window(kind)
            ok = allowed
            if window is not None and kv_len > window:
                ok = allowed & (k_pos[None, :] > q_pos[:, None] - window)
            out[kind] = None if bool(ok.all()) else _additive(ok, self.dtype)
        return out


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]
