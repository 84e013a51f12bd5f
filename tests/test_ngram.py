"""Prompt lookup: the pure n-gram matcher on tiny arrays."""
from __future__ import annotations

import numpy as np

from casspec.drafters.ngram import find_ngram_continuation


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
