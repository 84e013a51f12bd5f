"""Sizes with one source: a step's draft tree, the layer search's scratch rows, prompt chunks, and the KV
slots one generation reserves for them. Their relations are asserted here, at import."""
from __future__ import annotations

TREE_CAPACITY = 64  # draft-tree nodes per step, root included; DyTC's node budget and every fixed method fit
SEARCH_WINDOW = 32  # committed tokens the layer-set search re-runs teacher-forced (drafters/layer_search.py)
SCRATCH_OFFSET = TREE_CAPACITY  # the search writes its scratch KV this far past the committed length
PREFILL_CHUNK = 128  # prompt tokens per prefill forward, one request alone (measured fastest of 64..900 here)
PREFILL_RIDE = 64  # prompt tokens riding in a batched verify forward while other requests stream
MAX_CHAIN = 8  # longest chain a fixed method or one batched request drafts in a step
MAX_EXPANSION = 16  # longest chain one DyTC expansion drafts: a copied stretch (drafters/ngram.py) runs long;
# 16 measured 1.95x / 1.81x ar against 8's 1.90x / 1.72x on Gemma (Spec-Bench / own sets), level on SmolLM2


def generation_slots(prompt_tokens: int, max_new_tokens: int) -> int:
    """KV slots one generation needs: its tokens, then the draft tree and the search's scratch past the last."""
    return prompt_tokens + max_new_tokens + SCRATCH_OFFSET + SEARCH_WINDOW


assert SCRATCH_OFFSET >= TREE_CAPACITY, "search scratch must start past any draft tree"
assert MAX_CHAIN <= MAX_EXPANSION < TREE_CAPACITY and PREFILL_RIDE <= PREFILL_CHUNK
