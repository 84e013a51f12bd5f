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



def test_an_engine_generates_the_same_tokens_on_another_thread(llama_engine):
    prompt = "the cat sat on the mat. the cat"
    want = llama_engine.generate(prompt, method="casspec", max_new_tokens=24).token_ids
    release_openmp_pool()  # as casspec.load and the server's worker do before another thread takes over
    got: list[list[int]] = []
    worker = threading.Thread(target=lambda: got.append(
        llama_engine.generate(prompt, method="casspec", max_new_tokens=24).token_ids))
    worker.start()
    worker.join()
    assert got == [want]
