"""TargetRunner: owns the decoder-layer loop, run under execution plans.

One forward = embed -> RoPE tables -> for each layer: the attention and MLP sub-layers the plan keeps
-> final norm + head, reading and writing the shared StaticKVCache at explicit slots. Every drafter
and the verifier go through `forward`; the plan says which weights (fp32 or the int8 copy) and which
sub-layers run. Each sub-layer is three or four backend ops (backend.py), so a forward costs its
weight traffic plus a few hundred microseconds, not a thousand small ops.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from casspec.runtime import kernels, weight_cache
from casspec.runtime.adapter import LlamaAdapter, make_adapter
from casspec.runtime.backend import KernelBackend, TorchBackend
from casspec.runtime.kv_cache import StaticKVCache
from casspec.runtime.plans import FULL, ExecutionPlan
from casspec.runtime.vocab import DraftVocab
from casspec.runtime.weights import LayerWeights, ModelWeights

Masks = dict[str, torch.Tensor | None]


class TargetRunner:
    """Runs forwards of one HF causal LM under execution plans."""

    def __init__(self, model: nn.Module, use_kernels: bool | None = None, cache_dir: Path | None = None) -> None:
        self.model = model.eval()
        self.cache_dir = cache_dir  # where quantized copies are kept between processes (None: never saved)
        self.adapter: LlamaAdapter = make_adapter(model)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        if use_kernels is None:
            use_kernels = self.device.type == "cpu" and self.dtype == torch.float32 and kernels.available()
        self.backend: TorchBackend = KernelBackend() if use_kernels else TorchBackend()
        self.kernel_build = kernels.build_dir().name if use_kernels else "-"  # identifies the compiled kernels
        self.weights: ModelWeights = self.adapter.weights(tile=use_kernels)
        self._quantized: dict[str, ModelWeights] = {}
        self._fingerprint: str | None = None
        self.vocab: DraftVocab | None = None  # what PrunedVocab plans score (set by the drafter pool)
        self.build_log: list[tuple[str, float]] = []  # (what was built or read, seconds), in order

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

    def weights_for(self, plan: ExecutionPlan) -> ModelWeights:
        """The projections a plan reads; quantized copies are made once (`load()` makes them up front)."""
        if not plan.quantized:
            return self.weights
        if plan.weights not in self._quantized:
            self._quantized[plan.weights] = self._load_or_quantize(plan.weights)
        return self._quantized[plan.weights]

    def fingerprint(self) -> str | None:
        """A short id of these weights for cache file names (None without a cache folder)."""
        if self.cache_dir is not None and self._fingerprint is None:
            self._fingerprint = weight_cache.fingerprint(self.model)
        return self._fingerprint

    def quantized_cache_path(self, kind: str) -> Path | None:
        """Where the `kind` copy of these weights is kept on disk (None without a cache folder)."""
        key = self.fingerprint()
        return None if key is None else weight_cache.cache_path(self.cache_dir, key, kind)

    def _load_or_quantize(self, kind: str) -> ModelWeights:
        t0 = time.perf_counter()
        path = self.quantized_cache_path(kind)
        weights = weight_cache.load(self.weights, kind, path) if path is not None else None
        what = f"{kind} weights (read from cache)"
        if weights is None:
            weights = self.weights.quantized(kind)
            what = f"{kind} weights"
            if path is not None:
                weight_cache.save(weights, path)
        self.build_log.append((what, time.perf_counter() - t0))
        return weights

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
    ) -> torch.Tensor:  # [r, V] fp32 (or [0, V] if no rows)
        """One forward of `q` tokens under `plan`; returns logits for the requested rows (a PrunedVocab plan:
        over `token_ids(plan)`)."""
        a, ops = self.adapter, self.backend
        w = self.weights_for(plan)
        input_ids, positions, slots, allowed, key_positions, logits_rows = (
            None if t is None else t.to(self.device, non_blocking=True)
            for t in (input_ids, positions, slots, allowed, key_positions, logits_rows))
        kv_len = cache.check_slots(slots)
        h = a.embed(input_ids)  # [q, d]
        rope = a.rope(h, positions)  # layer type -> (cos, sin) [q, D/2]
        masks = self._masks(positions, slots, kv_len, allowed, key_positions)
        for i, lw in enumerate(w.layers):
            if plan.exit_layer is not None and i >= plan.exit_layer:
                break
            kind = a.layer_types[i]
            if plan.runs_attn(i):
                self._attention(lw, i, h, rope[kind], masks[kind], cache, slots, kv_len)
            if plan.runs_mlp(i):
                self._mlp(lw, h)
        if logits_rows is not None:
            if logits_rows.numel() == 0:
                return h.new_empty(0, a.vocab_size, dtype=torch.float32)
            h = h[logits_rows]
        if plan.vocab:  # [r, V'] over self.vocab.ids
            parts = [ops.linear(h, head, w.final_norm, a.eps) for head in self.draft_vocab().heads(plan.weights)]
            return a.softcap(torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]).float()
        return a.softcap(ops.linear(h, w.head, w.final_norm, a.eps)).float()

    def draft_vocab(self) -> DraftVocab:
        if self.vocab is None:
            raise RuntimeError("a PrunedVocab plan needs runner.vocab (DrafterPool.prepare sets it)")
        return self.vocab

    def token_ids(self, plan: ExecutionPlan) -> torch.Tensor | None:
        """Token id of each logit column `forward` returns under `plan` (None: column j is token j)."""
        return self.draft_vocab().ids if plan.vocab else None

    def _attention(self, lw: LayerWeights, i: int, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                   mask: torch.Tensor | None, cache: StaticKVCache, slots: torch.Tensor, kv_len: int) -> None:
        """h += attention sub-layer (in place)."""
        a, ops = self.adapter, self.backend
        k_cache, v_cache = cache.keys[i], cache.values[i]
        qkv = ops.linear(h, lw.qkv, lw.attn_norm, a.eps)  # [q, (H + 2 H_kv) D]
        q = ops.rope_kv(qkv, *rope, k_cache, v_cache, slots, a.num_heads, a.num_kv_heads, lw.q_norm, lw.k_norm,
                        a.eps)  # [q, H, D]
        o = ops.attention(q, k_cache, v_cache, kv_len, mask, a.scaling)  # [q, H D]
        if lw.post_attn_norm is None:
            ops.linear(o, lw.o, out=h)
        else:
            ops.add_rms_norm(h, ops.linear(o, lw.o), lw.post_attn_norm, a.eps)

    def _mlp(self, lw: LayerWeights, h: torch.Tensor) -> None:
        """h += gated MLP sub-layer (in place)."""
        a, ops = self.adapter, self.backend
        g = ops.linear(h, lw.gate_up, lw.mlp_norm, a.eps)  # [q, F] = act(gate) * up
        if lw.post_mlp_norm is None:
            ops.linear(g, lw.down, out=h)
        else:
            ops.add_rms_norm(h, ops.linear(g, lw.down), lw.post_mlp_norm, a.eps)

    def _masks(self, q_pos: torch.Tensor, slots: torch.Tensor, kv_len: int, allowed: torch.Tensor | None,
               k_pos: torch.Tensor | None) -> Masks:
        """Boolean [q, kv_len] masks per layer type (None where every key up to kv_len is visible)."""
        if allowed is None and slots.numel() == 1:
            base = None  # one token at the last slot sees every key
        else:
            base = allowed if allowed is not None else (
                torch.arange(kv_len, device=slots.device)[None, :] <= slots[:, None])  # causal by slot
        out: Masks = {}
        for kind in set(self.adapter.layer_types):
            window = self.adapter.window(kind)
            ok = base
            if window is not None and kv_len > window:
                k = k_pos if k_pos is not None else torch.arange(kv_len, device=slots.device)
                near = k[None, :] > q_pos[:, None] - window
                ok = near if ok is None else ok & near
            out[kind] = None if ok is None or bool(ok.all()) else ok.contiguous()
        return out
