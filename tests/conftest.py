"""Shared fixtures: tiny random-weight engines of each supported family."""
from __future__ import annotations

import pytest
import torch

from casspec.testing import tiny_engine

FAMILIES = ("llama", "qwen2", "gemma3")

torch.set_num_threads(1)  # tiny models gain nothing from threads; keeps the suite robust under load


@pytest.fixture(scope="session", params=FAMILIES)
def engine(request):
    return tiny_engine(request.param)


@pytest.fixture(scope="session")
def llama_engine():
    return tiny_engine("llama")
