"""CUDA path check (run on a GPU machine): greedy losslessness of every method on tiny models, and the
verification cost curve of a SmolLM2-shaped model (random weights; timings only).

    PYTHONPATH=src python benchmarks/gpu_check.py
"""
from __future__ import annotations

import statistics
import sys
import time
import traceback

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from casspec.api import Engine
from casspec.runtime.plans import FULL, LayerSkip
from casspec.runtime.runner import TargetRunner
from casspec.testing import tiny_model, tiny_tokenizer

PROMPT = "the quick brown fox jumps over the lazy dog. the quick brown fox"


def check_methods(device: str) -> bool:
    ok = True
    for family in ("llama", "qwen2", "gemma3"):
        engine = Engine(tiny_model(family).to(device), tiny_tokenizer(), name=f"tiny-{family}")
        ref = engine.generate(PROMPT, "ar", max_new_tokens=24).token_ids
        for method in engine.methods:
            try:
                out = engine.generate(PROMPT, method, max_new_tokens=24)
                same = out.token_ids == ref
                engine.generate(PROMPT, method, max_new_tokens=8, temperature=0.8, top_p=0.9, seed=1)  # runs
                print(f"{family:7s} {method:15s} lossless={same} mal={out.stats.mean_accepted_length:.2f}")
                ok &= same
            except Exception:  # report every broken method, not only the first
                ok = False
                print(f"{family:7s} {method:15s} ERROR\n" + "\n".join(traceback.format_exc().splitlines()[-8:]))
    return ok


def curve(device: str, dtype: torch.dtype) -> None:
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device).eval()
    runner = TargetRunner(model)
    half = LayerSkip(attn=frozenset(range(1, 30, 2)), mlp=frozenset(range(1, 30, 2)))
    ctx = 512
    for name, plan in (("full", FULL), ("skip0.5", half)):
        row = []
        for q in (1, 2, 4, 8, 16, 32, 64):
            cache = runner.new_cache(ctx + q + 1)
            cache.length = ctx
            ids = torch.randint(0, 1000, (q,), device=device)
            pos = torch.arange(ctx, ctx + q, device=device)
            times = []
            for _ in range(12):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                runner.forward(ids, pos, pos, cache, plan)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            row.append(f"q{q}={statistics.median(times[2:]) * 1e3:.2f}")
        print(f"{dtype} {name}: " + " ".join(row) + " ms")


if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name(0))
    good = check_methods("cuda")
    for dt in (torch.float32, torch.bfloat16):
        curve("cuda", dt)
    sys.exit(0 if good else 1)
