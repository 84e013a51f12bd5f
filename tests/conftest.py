"""Shared fixtures: tiny random-weight engines of each supported family, and the tiny model behind a real server."""
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


# -- the tiny random model behind a real server (the serving tests) ------------------------------------------
@pytest.fixture(scope="module")
def ref():
    return tiny_engine()


@pytest.fixture(scope="module")
def tiny():
    from casspec.server import create_app
    from helpers import ThreadServer

    app = create_app(tiny_engine(), method="casspec", max_queue=16, max_tokens_limit=64, request_timeout=120)
    with ThreadServer(app) as srv:
        yield srv
