"""Continuous batching of speculative decoding: a batched step, a load-aware planner, an engine loop."""
from casspec.batching.engine import BatchEngine
from casspec.batching.planner import BatchPlanner
from casspec.batching.step import BATCH_METHODS, BatchDecoder

__all__ = ["BATCH_METHODS", "BatchDecoder", "BatchEngine", "BatchPlanner"]
