"""Prompt lookup: the pure n-gram matcher on tiny arrays."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from casspec.drafters.ngram import NgramIndex, find_ngram_continuation, find_ngram_match


def f(tokens, max_n=3, min_n=1, k=4):
    return find_ngram_continuation(np.array(tokens), max_n, min_n, k)


def test_docstring_example():
    assert f([1, 2, 3, 4, 2, 3], k=2) == ([4, 2], 2)


def test_longest_match_wins_over_shorter():
    # suffix [7, 8, 9] occurs at 0 (3-gram); the 1-gram [9] also occurs at 5
    assert f([7, 8, 9, 1, 2, 9, 5, 7, 8, 9]) == ([1, 2, 9, 5], 3)


def test_latest_occurrence_is_used():
    assert f([5, 1, 5, 2, 5], max_n=1, k=1) == ([2], 1)


def test_no_match_is_empty():
    assert f([1, 2, 3, 4]) == ([], 0)
    assert f([1]) == ([], 0)


def test_min_n_gates_short_matches():
    assert f([1, 2, 3, 1], min_n=2) == ([], 0)
    assert f([1, 2, 3, 1], min_n=1) == ([2, 3, 1], 1)


def test_continuation_truncated_at_end():
    assert f([1, 2, 1, 2], k=10) == ([1, 2], 2)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=40), st.lists(st.integers(0, 4), max_size=6),
       st.integers(1, 4), st.integers(1, 3), st.integers(0, 40))
def test_the_index_finds_what_the_scan_finds(tokens, path, max_n, min_n, grow):
    """NgramIndex.match over a text indexed as it grew equals the scan of the whole text plus the draft path."""
    index = NgramIndex(max_n)
    index.update(tokens[:grow])  # indexed earlier, at a shorter length
    want = find_ngram_match(np.array(tokens + path), max_n, min_n)
    assert index.match(tokens, path, min_n) == want
