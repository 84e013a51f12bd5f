"""Tiny random-weight models for tests: Llama, Qwen2 and Gemma 3 families, with a byte-level tokenizer."""
from __future__ import annotations

from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

SPECIALS = ["<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|eos|>' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: 256 byte tokens + 4 specials; any text round-trips."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for s in SPECIALS:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>")
    fast.add_special_tokens({"additional_special_tokens": SPECIALS[2:]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(family: str = "llama", vocab_size: int = 260, **sizes: int):
    """A few-layer config of the given family with sizes that run in milliseconds (`sizes` override them)."""
    common: dict[str, Any] = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                  bos_token_id=256, eos_token_id=257, tie_word_embeddings=False)
    common.update(sizes)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "gemma3":
        return Gemma3TextConfig(**common, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                                layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                             "sliding_attention"], pad_token_id=0)
    raise ValueError(f"unknown tiny family {family!r}")


def tiny_model(family: str = "llama", seed: int = 0, vocab_size: int = 260, **sizes: int) -> PreTrainedModel:
    """Random-weight model (weights scaled up so logits are far from ties)."""
    torch.manual_seed(seed)
    cfg = tiny_config(family, vocab_size, **sizes)
    cfg._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15)
    return model.eval()


def tiny_engine(family: str = "llama", seed: int = 0):
    """An Engine over a tiny random model; loads in well under a second."""
    from casspec.api import Engine

    model = tiny_model(family, seed)
    return Engine(model, tiny_tokenizer(), name=f"tiny-{family}")
