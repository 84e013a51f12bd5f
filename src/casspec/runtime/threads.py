"""OpenMP thread pools when a model moves between Python threads.

libgomp (torch's OpenMP, and so casspec's kernels') keeps a pool of worker threads for every thread that
ever ran a parallel region, and once it manages more threads than the machine has cores it stops letting
idle workers spin between regions: each region then waits for its workers to wake (~50 us), and a forward
runs hundreds of regions. A server loads its model on the main thread and decodes on a worker thread, so
two pools exist. Measured on SmolLM2, 2 cores, 2 torch threads: a forward takes 6.9 ms on the main
thread and 16.1 ms on a worker thread (the server streamed 59 tok/s where the engine runs 120-140);
releasing the main thread's pool first (OpenMP 5's omp_pause_resource_all, soft) gives 6.9 ms on both.
"""
from __future__ import annotations

import ctypes
import logging

log = logging.getLogger("casspec.runtime")

_OMP_PAUSE_SOFT = 1


def release_openmp_pool() -> bool:
    """Release the calling thread's OpenMP worker threads (created again on its next parallel region).
    Call it on the thread that loaded or ran the model, before another thread takes the model over, never
    inside a parallel region. False where the OpenMP runtime has no such call (not libgomp, too old)."""
    try:
        gomp = ctypes.CDLL("libgomp.so.1")  # the copy already loaded with torch
        pause = gomp.omp_pause_resource_all
    except (OSError, AttributeError):
        return False
    pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
    ok = pause(_OMP_PAUSE_SOFT) == 0
    if not ok:
        log.debug("omp_pause_resource_all failed; the model's thread keeps a second OpenMP pool")
    return ok
