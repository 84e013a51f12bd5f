"""OpenMP pools when a model moves to a worker thread (runtime/threads.py)."""
from __future__ import annotations

import sys
import threading

import pytest
import torch

from casspec.runtime.threads import release_openmp_pool


@pytest.mark.skipif(sys.platform != "linux" or "OpenMP" not in torch.__config__.parallel_info(),
                    reason="torch without libgomp")
def test_the_pool_is_released_and_parallel_work_goes_on_in_any_thread():
    a = torch.randn(300, 300)
    want = a @ a  # this thread now has an OpenMP pool
    assert release_openmp_pool()
    got: list[torch.Tensor] = []
    worker = threading.Thread(target=lambda: got.append(a @ a))
    worker.start()
    worker.join()
    assert torch.equal(got[0], want)
    assert torch.equal(a @ a, want)  # the released thread builds a new pool on its next parallel region
