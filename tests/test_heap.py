"""heap.settle: objects alive at load time leave the collector's sight; new garbage is still collected."""
from __future__ import annotations

import gc
import weakref

from casspec.runtime import heap


def test_settle_freezes_what_is_alive_and_later_cycles_are_still_collected():
    try:
        heap.settle()
        assert gc.get_freeze_count() > 0
        cycle: list = []
        cycle.append(cycle)
        del cycle
        assert gc.collect() >= 1  # garbage made after settling is not frozen
    finally:
        gc.unfreeze()


def test_release_makes_settled_cycles_collectable_again():
    """A cycle alive at settle time outlives its last use while frozen, and is freed once released."""
    class Node:
        pass

    try:
        node = Node()
        node.me = node  # type: ignore[attr-defined]
        ref = weakref.ref(node)
        heap.settle()
        del node
        gc.collect()
        assert ref() is not None
        heap.release()
        assert ref() is None and gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()
