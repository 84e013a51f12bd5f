"""Execution plans: the runner's Full plan reproduces HF logits; the other plans are what they say."""
from __future__ import annotations

import pytest
import torch

import torch.nn.functional as F
from torch import nn

from casspec.target.adapter import LlamaAdapter
from casspec.target.fast_linear import MAX_FAST_ROWS, FastLinear
from casspec.target.plans import FULL, EarlyExit, Int8, LayerSkip

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


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 16, MAX_FAST_ROWS, MAX_FAST_ROWS + 1])
def test_fast_linear_equals_linear(bias, rows):
    lin = nn.Linear(48, 80, bias=bias)
    x = torch.randn(1, rows, 48)
    torch.testing.assert_close(FastLinear(lin)(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)


def test_fused_projections_compute_the_parts(engine):
    import copy

    layer = copy.deepcopy(engine.runner.adapter.layers[0])
    attn, mlp = layer.self_attn, layer.mlp
    x = torch.randn(1, 5, attn.q_proj.in_features)
    parts = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]
    gate_up = torch.cat([mlp.gate_proj(x), mlp.up_proj(x)], -1)
    LlamaAdapter.fuse_projections(layer)
    assert not hasattr(attn, "q_proj") and not hasattr(mlp, "gate_proj")
    for got, want in zip(attn.qkv_proj(x).split(attn.qkv_sizes, -1), parts):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(mlp.gate_up_proj(x), gate_up)
