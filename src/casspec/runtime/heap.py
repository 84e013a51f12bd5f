"""Python's garbage collector beside a loaded model.

A loaded engine is ~380k Python objects (SmolLM2: the HF model's modules and parameters, the tokenizer, the
drafter pool). They live as long as the process, yet every full collection walks them all: measured ~0.2 s
with nothing to free, a stall that lands in the middle of some request's decoding (one Spec-Bench answer of
59 tokens took 0.72 s against 0.51 s for the same tokens in the next run). Python triggers a full collection
once enough new objects outlive two collections, so a long benchmark or a server meets it again and again.
"""
from __future__ import annotations

import gc


def settle() -> None:
    """Collect once, then leave every object alive now out of later collections (gc.freeze): call it after
    loading, in a process that keeps its engines (the CLI, the server, the benchmarks). Reference counting
    still frees those objects; only cycles among them would outlive their last use."""
    gc.collect()
    gc.freeze()


def release() -> None:
    """Undo `settle` and collect: after dropping an engine, so that cycles among its objects are freed too."""
    gc.unfreeze()
    gc.collect()
