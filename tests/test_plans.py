"""Execution plans: the runner's Full plan reproduces HF logits; the other plans are what they say."""
from __future__ import annotations

import pytest
import torch

from casspec.runtime.plans import FULL, EarlyExit, Int8, LayerSkip

IDS = torch.randint(0, 256, (24,), generator=torch.Generator().manual_seed(0))


def _run(engine, plan, ids=IDS):
    r = engine.runner
    pos = torch.arange(len(ids))
    return r.forward(ids, pos, pos, r.new_cache(64), plan)


def test_full_plan_equals_hf_forward(engine):
    ref = engine.hf_model(IDS[None]).logits[0]
    torch.testing.assert_close(_run(engine, FULL), ref, rtol=0, atol=1e-5)


def test_empty_skip_is_full(engine):
    assert LayerSkip() == FULL
    torch.testing.assert_close(_run(engine, LayerSkip()), _run(engine, FULL))


def test_skipping_changes_logits_and_early_exit_equals_skipping_the_top(engine):
    n = engine.runner.num_layers
    skip = _run(engine, LayerSkip(attn={1}, mlp={1, 2}))
    assert not torch.allclose(skip, _run(engine, FULL))
    top = set(range(2, n))
    torch.testing.assert_close(_run(engine, EarlyExit(2)), _run(engine, LayerSkip(attn=top, mlp=top)))


def test_int8_is_close_but_not_identical(engine):
    full, q = _run(engine, FULL), _run(engine, Int8())
    assert not torch.equal(full, q)
    assert (full.argmax(-1) == q.argmax(-1)).float().mean() > 0.6


def test_plan_mixing_and_names():
    mixed = Int8() | LayerSkip(mlp={3}) | EarlyExit(10) | EarlyExit(8)
    assert mixed.quantized and mixed.skip_mlp == {3} and mixed.exit_layer == 8
    assert mixed.name == "int8+skip(a0,m1)+exit8"
    assert LayerSkip(attn={0}, mlp={0, 1}).sparsity(4) == pytest.approx(3 / 8)
    assert EarlyExit(2).attn_layers(4) == {0, 1}
    with pytest.raises(ValueError):
        EarlyExit(0)
