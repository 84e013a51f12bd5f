"""heap.settle: objects alive at load time leave the collector's sight; new garbage is still collected."""
from __future__ import annotations

import gc

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
