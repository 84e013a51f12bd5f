"""DraftTree masks, positions and paths against hand-written expectations."""
from __future__ import annotations

import pytest
import torch

from casspec.tree import DraftTree


def _tree() -> DraftTree:
    #        0
    #      /   \
    #     1     2
    #    / \     \
    #   3   4     5
    t = DraftTree(root_token=10, base=3)
    for parent, tok in [(0, 11), (0, 12), (1, 13), (1, 14), (2, 15)]:
        t.add(parent, tok, "d", 0.5, 0.5)
    return t


def test_ancestor_mask_matches_hand_written():
    x = _tree().segment(None)
    expected_tree = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 1, 0, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [1, 0, 1, 0, 0, 1],
    ], dtype=torch.bool)
    assert x.allowed[:, :3].all()  # committed prefix visible to every node
    assert torch.equal(x.allowed[:, 3:], expected_tree)
    assert x.positions.tolist() == [3, 4, 4, 5, 5, 5]
    assert x.slots.tolist() == [3, 4, 5, 6, 7, 8]
    assert x.key_positions.tolist() == [0, 1, 2, 3, 4, 4, 5, 5, 5]


def test_subset_rows_see_only_their_ancestors():
    x = _tree().segment(None, [2, 5])
    assert x.allowed.shape == (2, 3 + 6)
    assert x.allowed[1, 3:].tolist() == [True, False, True, False, False, True]
    assert x.input_ids.tolist() == [12, 15]


def test_paths_leaves_and_duplicate_one_hot_children():
    t = _tree()
    assert t.path(4) == [0, 1, 4]
    assert t.path_tokens(5) == [12, 15]
    assert t.leaves() == [3, 4, 5]
    assert t.add(1, 13, "other", 0.1, 0.1) == 3  # same one-hot token under the same parent: merged
    assert t.add(1, 13, "other", 0.1, 0.1, q=torch.ones(20) / 20) == 6  # sampled drafts are never merged


def test_capacity_is_enforced():
    t = DraftTree(0, 0, capacity=3)
    t.add(0, 1, "d", 1, 1)
    t.add(1, 2, "d", 1, 1)
    assert t.is_full
    with pytest.raises(IndexError):
        t.add(2, 3, "d", 1, 1)
