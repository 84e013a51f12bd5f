"""Tiny models stored as GGUF files in a chosen block format, for tests of the native target.

`write_gguf(model, path, qtype)` writes an HF model the way llama.cpp's converter lays it out (its tensor
names, Q/K rows interleaved for llama, Gemma norms stored as 1 + w), projections and embedding in
`qtype`. gguf-py quantizes Q8_0, Q4_0, Q4_1 and Q5_0 (and F16 / BF16); it has no K-quant quantizer, so
Q4_K and Q6_K tensors are written as random valid blocks (sane scales) instead of the model's values.
Rows too short for a format's blocks fall back to Q8_0, as llama.cpp's quantizer does.
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from casspec.runtime.gguf_file import GGUFFile
from casspec.runtime.sources import GGUFSource

ARCH = {"llama": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3"}
RANDOM_BLOCKS = {gguf.GGMLQuantizationType.Q4_K: (0, 2), gguf.GGMLQuantizationType.Q6_K: (208,)}


def write_gguf(model: PreTrainedModel, path: Path, qtype: gguf.GGMLQuantizationType, seed: int = 0) -> Path:
    """Write `model`'s tensors to a GGUF file at `path` (tensors and architecture only: no tokenizer)."""
    cfg = model.config
    arch = ARCH[cfg.model_type]
    names = gguf.get_tensor_name_map({v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch], cfg.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), arch)
    rng = np.random.default_rng(seed)
    for name, p in model.state_dict().items():
        base, kind = name.rsplit(".", 1)
        mapped = names.get_name(base)
        if mapped is None or (base == "lm_head" and cfg.tie_word_embeddings):
            continue
        w = p.detach().float().numpy().copy()
        if arch == "llama" and mapped.endswith(("attn_q", "attn_k")) and kind == "weight":
            heads = cfg.num_attention_heads if mapped.endswith("attn_q") else cfg.num_key_value_heads
            w = _permute(w, heads)
        if arch == "gemma3" and "norm" in mapped:
            w = w + 1
        if w.ndim == 1:
            writer.add_tensor(f"{mapped}.{kind}", w.astype(np.float32))
        else:
            fmt = qtype if w.shape[1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0 else gguf.GGMLQuantizationType.Q8_0
            data = _random_blocks(w.shape, fmt, rng) if fmt in RANDOM_BLOCKS else gguf.quants.quantize(w, fmt)
            writer.add_tensor(f"{mapped}.{kind}", data, raw_dtype=fmt)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def load_native(model: PreTrainedModel, path: Path) -> tuple[PreTrainedModel, GGUFSource]:
    """A meta-device skeleton of `model`'s architecture and the GGUF file's tensors."""
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model.config)
    return skeleton.eval(), GGUFSource(GGUFFile(path), model.config, model.config.num_hidden_layers)


def dequantized_model(model: PreTrainedModel, source: GGUFSource) -> PreTrainedModel:
    """A copy of `model` holding the GGUF file's values in fp32 (what HF transformers would load)."""
    return source.dequantized_model(model.config)


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter: rotary halves -> interleaved pairs, per head."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _random_blocks(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType, rng: np.random.Generator) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n, k = shape
    raw = rng.integers(0, 256, size=(n, k // block, size), dtype=np.uint8)
    d = (rng.random((n, k // block)) * 0.004 + 0.002).astype(np.float16).view(np.uint8).reshape(n, k // block, 2)
    for offset in RANDOM_BLOCKS[qtype]:
        raw[..., offset:offset + 2] = d
    return raw.reshape(n, -1)
