"""casspec: CAS-Spec (arXiv 2510.26843), training-free lossless cascade self-speculative decoding."""
from __future__ import annotations

from typing import TYPE_CHECKING

from casspec.errors import CasspecError, ContextOverflowError, InvalidRequestError, ModelNotFoundError
from casspec.metrics import GenerationResult, GenerationStats

__all__ = ["load", "Engine", "CasspecError", "ContextOverflowError", "InvalidRequestError", "ModelNotFoundError",
           "GenerationResult", "GenerationStats"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from casspec.api import Engine


def load(model: str | None = None, *, device: str = "cpu", dtype: str = "float32",
         hierarchy: tuple[str, ...] | None = None) -> Engine:
    """Load a model (None/"smollm2", "gemma3-270m", an HF directory, a .gguf file or a hub id) into an Engine.
    `hierarchy`: the draft levels DyTC chooses from (pool.DRAFTERS; default: the measured best for the device)."""
    import time

    from casspec.api import Engine
    from casspec.runtime.loading import load_model, model_cache_dir

    t0 = time.perf_counter()
    loaded = load_model(model, device=device, dtype=dtype)
    engine = Engine(loaded.model, loaded.tokenizer, name=loaded.name, cache_dir=model_cache_dir(), source=loaded.source,
                    gguf_path=loaded.gguf_path, hierarchy=hierarchy)
    engine.load_seconds = time.perf_counter() - t0
    # loading ran parallel regions here: free this thread's OpenMP workers, so that a server may decode on
    # another thread at full speed (runtime/threads.py); this thread builds them again if it computes on
    from casspec.runtime.threads import release_openmp_pool

    release_openmp_pool()
    return engine


def __getattr__(name: str) -> object:
    if name == "Engine":
        from casspec.api import Engine

        return Engine
    raise AttributeError(name)
