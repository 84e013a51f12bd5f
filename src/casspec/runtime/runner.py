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
from typing import Literal

import torch
from torch import nn

from casspec.runtime import kernels, weight_cache
from casspec.runtime.adapter import LlamaAdapter, make_adapter
from casspec.runtime.argmax_head import ArgmaxHead
from casspec.runtime.backend import MAX_KERNEL_ROWS, Backend, KernelBackend, LayerShape, TorchBackend
from casspec.runtime.batch import Rows, Segment
from casspec.runtime.kv_cache import KVPool, SeqCache, StaticKVCache
from casspec.runtime.plans import FULL, ExecutionPlan
from casspec.runtime.sources import GGUFSource
from casspec.runtime.vocab import DraftVocab
from casspec.runtime.weights import LayerWeights, ModelWeights, with_act8

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STREAM_POOL_SLOTS = 4096  # the largest single-sequence pool a runner keeps for reuse (SmolLM2: 188 MB of KV)
STREAM_POOL_STEP = 512  # its size is a multiple of this (a request a little longer than the last reuses it)


class TargetRunner:
    """Runs forwards of one HF causal LM under execution plans."""

    def __init__(self, model: nn.Module, use_kernels: bool | None = None, cache_dir: Path | None = None,
                 source: GGUFSource | None = None) -> None:
        """`model` is an HF causal LM, or (with `source`, a GGUF file's tensors) its skeleton on the meta device."""
        self.model = model.eval()
        self.cache_dir = cache_dir  # where quantized copies are kept between processes (None: never saved)
        self.source = source
        self.adapter: LlamaAdapter = make_adapter(model, source)
        param = next(model.parameters())
        self.device = torch.device("cpu") if source is not None else param.device
        self.dtype = torch.float32 if source is not None else param.dtype
        if use_kernels is None:
            use_kernels = self.device.type == "cpu" and self.dtype in _KERNEL_DTYPES and kernels.available()
        if use_kernels:
            self.dtype = torch.float32  # activations and the KV cache; bf16 / fp16 weights stay as they are
        self.torch_backend = TorchBackend()
        self.backend: Backend = KernelBackend() if use_kernels else self.torch_backend
        self.kernel_build = kernels.build_dir().name if use_kernels else "-"  # identifies the compiled kernels
        self.weights: ModelWeights = self.adapter.weights(tile=use_kernels)
        self._quantized: dict[str, ModelWeights] = {}
        self._fingerprint: str | None = None
        self.vocab: DraftVocab | None = None  # what PrunedVocab plans score (set by the drafter pool)
        self._windows = {t: self.adapter.window(t) for t in set(self.adapter.layer_types)}
        self.build_log: list[tuple[str, float]] = []  # (what was built or read, seconds), in order
        self._stream_pool: KVPool | None = None  # the pool `stream_cache` carves single sequences from
        self.use_argmax_head = True  # greedy rows may take their argmax from runtime/argmax_head.py
        self._argmax_head: ArgmaxHead | Literal[False] | None = None  # None: not built yet; False: not possible
        self._argmax_rows: int | None = None  # the argmax head's max_rows when given (None: timed when built)

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

    def new_cache(self, capacity: int) -> SeqCache:
        """A private cache for one sequence (a pool of its own)."""
        a = self.adapter
        return StaticKVCache(a.num_layers, a.num_kv_heads, a.head_dim, capacity, self.dtype, self.device)

    def stream_cache(self, capacity: int) -> SeqCache:
        """A cache for one sequence from the runner's reusable pool: free it (`cache.pool.free(cache)`) when the
        sequence ends and the next one takes the same memory, instead of allocating and page-faulting new zeroed
        buffers (5 / 16 / 46 ms for 512 / 1,500 / 4,096 SmolLM2 slots, each request). Its slots hold earlier
        sequences' finite KV until written, as a batch pool's regions do: the attention masks never read them.
        A larger request replaces the pool with one of its size rounded up to STREAM_POOL_STEP (at most
        STREAM_POOL_SLOTS kept; longer ones get a private cache, freed with the request); one that finds the pool
        busy gets a private cache."""
        pool = self._stream_pool
        if pool is not None and capacity <= pool.capacity:
            return pool.alloc(capacity) or self.new_cache(capacity)
        if capacity > STREAM_POOL_SLOTS:
            return self.new_cache(capacity)
        size = min(-(-capacity // STREAM_POOL_STEP) * STREAM_POOL_STEP, STREAM_POOL_SLOTS)  # a chat's next turn fits
        self._stream_pool = self.new_pool(size)  # a sequence still in the old pool keeps it alive
        cache = self._stream_pool.alloc(capacity)
        assert cache is not None
        return cache

    def new_pool(self, capacity: int) -> KVPool:
        """A KV pool that sequences of a batch take regions from."""
        a = self.adapter
        return KVPool(a.num_layers, a.num_kv_heads, a.head_dim, capacity, self.dtype, self.device)

    def weights_for(self, plan: ExecutionPlan) -> ModelWeights:
        """The projections a plan reads; quantized copies are made once (`load()` makes them up front)."""
        if not plan.quantized:
            return self.weights
        if plan.weights == "a8" and "a8" not in self._quantized:  # the same blocks, no copy
            self._quantized["a8"] = self.weights.map_projections(lambda _key, p: with_act8(p))
        if plan.weights == "lowbit" and "lowbit" not in self._quantized:
            raise RuntimeError("a LowBit plan needs its weights installed (DrafterPool builds them)")
        if plan.weights not in self._quantized:
            self._quantized[plan.weights] = self._load_or_quantize(plan.weights)
        return self._quantized[plan.weights]

    def install(self, kind: str, weights: ModelWeights) -> None:
        """The weights plans of `kind` read from now on (a copy made outside the runner: LowBit's)."""
        self._quantized[kind] = weights

    def fingerprint(self) -> str | None:
        """A short id of these weights for cache file names (None without a cache folder)."""
        if self.cache_dir is not None and self._fingerprint is None:
            self._fingerprint = weight_cache.fingerprint(self.model, self.source)
        return self._fingerprint

    def quantized_cache_path(self, kind: str) -> Path | None:
        """Where the `kind` copy of these weights is kept on disk (None without a cache folder)."""
        key = self.fingerprint()
        # a fingerprint is only taken with a cache folder, so key is None exactly when cache_dir is
        return None if key is None or self.cache_dir is None else weight_cache.cache_path(self.cache_dir, key, kind)

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
        slots: torch.Tensor,  # [q] cache slots written (relative to the cache's region)
        cache: SeqCache,
        plan: ExecutionPlan = FULL,
        allowed: torch.Tensor | None = None,  # [q, kv_len] bool; None = causal by slot
        key_positions: torch.Tensor | None = None,  # [kv_len]; None = slot index
        logits_rows: torch.Tensor | None = None,  # [r] rows needing logits; None = all
        prefill: bool = False,  # long inputs may then run on the torch backend (MKL's GEMM)
        argmax_only: bool = False,  # only each row's first argmax is read (forward_batch)
    ) -> torch.Tensor:  # [r, V] fp32 (or [0, V] if no rows)
        """One forward of `q` tokens of one sequence under `plan`; logits for the requested rows (a
        PrunedVocab plan: over `token_ids(plan)`)."""
        segment = Segment(cache, input_ids, positions, slots, allowed, key_positions)
        return self.forward_batch([segment], plan, logits_rows, prefill, argmax_only)

    @torch.inference_mode()
    def forward_batch(self, segments: list[Segment], plan: ExecutionPlan = FULL,
                      logits_rows: torch.Tensor | None = None, prefill: bool = False,
                      argmax_only: bool = False) -> torch.Tensor:
        """One forward over the rows of several sequences (same KV pool); logits rows index the concatenation.
        `argmax_only`: the caller reads only each row's first argmax (greedy, no logprobs), so a head that
        can (runtime/argmax_head.py) returns exact logits where a row's maximum may be and -inf elsewhere."""
        a = self.adapter
        rows = Rows.build(segments, self._windows, self.device)
        w = self.weights_for(plan)
        long_prefill = prefill and rows.input_ids.numel() > MAX_KERNEL_ROWS and not w.head.native
        ops = self.torch_backend if long_prefill else self.backend  # MKL for fp32 weights; blocks stay in kernels
        keys, values = segments[0].cache.keys, segments[0].cache.values
        h = a.embed(rows.input_ids)  # [M, d]
        rope = a.rope(h, rows.positions)  # layer type -> (cos, sin) [M, D/2]
        shape = LayerShape(a.num_heads, a.num_kv_heads, a.eps, a.scaling)
        for i, lw in enumerate(w.layers):
            if plan.exit_layer is not None and i >= plan.exit_layer:
                break
            kind, attn, mlp = a.layer_types[i], plan.runs_attn(i), plan.runs_mlp(i)
            if not ops.layer(lw, h, rope[kind], keys[i], values[i], rows.slots, rows.key_lo, rows.key_len,
                             rows.masks[kind], shape, attn, mlp):  # the same ops one by one
                if attn:
                    self._attention(ops, lw, h, rope[kind], rows, rows.masks[kind], keys[i], values[i])
                if mlp:
                    self._mlp(ops, lw, h)
        if logits_rows is not None:
            if logits_rows.numel() == 0:
                return h.new_empty(0, a.vocab_size, dtype=torch.float32)
            h = h[logits_rows.to(self.device)]
        if plan.vocab:  # [r, V'] over self.vocab.ids
            parts = [ops.linear(h, head, w.final_norm, a.eps) for head in self.draft_vocab().heads(plan.weights)]
            return a.softcap(torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]).float()
        if argmax_only and plan.is_full and self.argmax_verifies() and (head := self.argmax_head()) is not None:
            return head.logits(h, w.final_norm, a.eps, a.softcap)
        return a.softcap(ops.linear(h, w.head, w.final_norm, a.eps)).float()

    def argmax_verifies(self) -> bool:
        """Whether a forward_batch with argmax_only runs the argmax head (else the full head); builds nothing."""
        return self.use_argmax_head and self._argmax_possible()

    def _argmax_possible(self) -> bool:
        return isinstance(self.backend, KernelBackend) and ArgmaxHead.supports(self.weights.head)

    def argmax_head(self) -> ArgmaxHead | None:
        """The target's argmax-exact head where its format allows (built on first use), else None."""
        if self._argmax_head is None:
            self._argmax_head = False
            if self._argmax_possible():
                assert isinstance(self.backend, KernelBackend)  # (_argmax_possible)
                self._argmax_head = ArgmaxHead(self.weights.head, self.backend.ops, max_rows=self._argmax_rows)
        return self._argmax_head or None

    def set_argmax_rows(self, rows: int) -> None:
        """The most rows that take the argmax head (its `max_rows`), now or when it is built: a value measured
        once per machine (DrafterPool keeps it beside the latency calibration), not timed again at every load."""
        self._argmax_rows = rows
        if self._argmax_head:
            self._argmax_head.max_rows = rows

    def _attention(self, ops: Backend, lw: LayerWeights, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                   rows: Rows, mask: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        """h += attention sub-layer (in place)."""
        a = self.adapter
        qkv = ops.linear(h, lw.qkv, lw.attn_norm, a.eps)  # [M, (H + 2 H_kv) D]
        q = ops.rope_kv(qkv, *rope, k_cache, v_cache, rows.slots, a.num_heads, a.num_kv_heads, lw.q_norm, lw.k_norm,
                        a.eps)  # [M, H, D]
        o = ops.attention(q, k_cache, v_cache, rows.key_lo, rows.key_len, mask, a.scaling)  # [M, H D]
        if lw.post_attn_norm is None:
            ops.linear(o, lw.o, out=h)
        else:
            ops.add_rms_norm(h, ops.linear(o, lw.o), lw.post_attn_norm, a.eps)

    def _mlp(self, ops: Backend, lw: LayerWeights, h: torch.Tensor) -> None:
        """h += gated MLP sub-layer (in place)."""
        a = self.adapter
        g = ops.linear(h, lw.gate_up, lw.mlp_norm, a.eps)  # [M, F] = act(gate) * up
        if lw.post_mlp_norm is None:
            ops.linear(g, lw.down, out=h)
        else:
            ops.add_rms_norm(h, ops.linear(g, lw.down), lw.post_mlp_norm, a.eps)

    def plan_weights(self, plan: ExecutionPlan) -> tuple[str, int]:
        """The weight formats a forward under `plan` reads and its bytes of weights per step."""
        w = self.weights_for(plan)
        projs = [p for i, lw in enumerate(w.layers) for p, runs in
                 ((lw.qkv, plan.runs_attn(i)), (lw.o, plan.runs_attn(i)), (lw.gate_up, plan.runs_mlp(i)),
                  (lw.down, plan.runs_mlp(i))) if runs]
        projs += self.draft_vocab().heads(plan.weights) if plan.vocab else [w.head]
        formats = "+".join(sorted({f for p in projs for f in p.formats.split("+")}))
        return (formats + (" a8" if plan.weights == "a8" else "")), sum(p.nbytes for p in projs)

    def draft_vocab(self) -> DraftVocab:
        if self.vocab is None:
            raise RuntimeError("a PrunedVocab plan needs runner.vocab (DrafterPool.prepare sets it)")
        return self.vocab

    def token_ids(self, plan: ExecutionPlan) -> torch.Tensor | None:
        """Token id of each logit column `forward` returns under `plan` (None: column j is token j)."""
        return self.draft_vocab().ids if plan.vocab else None
