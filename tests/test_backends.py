"""The runner on casspec's kernels equals the runner on stock torch ops, for every plan and tree shape."""
from __future__ import annotations

import pytest
import torch

from casspec.runtime import kernels
from casspec.runtime.backend import MAX_KERNEL_ROWS, TorchBackend
from casspec.runtime.plans import FULL, Int8, LayerSkip
from casspec.runtime.runner import TargetRunner
from casspec.testing import tiny_model

pytestmark = pytest.mark.skipif(not kernels.available(), reason="casspec CPU kernels need x86-64 AVX2 and a compiler")
PLANS = [FULL, Int8(), LayerSkip(attn={1}, mlp={2}), Int8() | LayerSkip(mlp={1})]


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma3"])
def runners(request):
    model = tiny_model(request.param)
    return TargetRunner(model, use_kernels=True), TargetRunner(model, use_kernels=False)


def _tree_inputs(n_committed: int):
    """A 5-node tree on top of `n_committed` tokens: root, two children, a grandchild under each."""
    parents = [-1, 0, 0, 1, 2]
    depth = [0, 1, 1, 2, 2]
    anc = torch.zeros(5, 5, dtype=torch.bool)
    for i, p in enumerate(parents):
        anc[i] = anc[p] if p >= 0 else anc[i]
        anc[i, i] = True
    allowed = torch.cat([torch.ones(5, n_committed, dtype=torch.bool), anc], dim=1)
    positions = n_committed + torch.tensor(depth)
    key_positions = torch.cat([torch.arange(n_committed), positions])
    return positions, n_committed + torch.arange(5), allowed, key_positions


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: p.name)
def test_kernel_runner_equals_torch_runner(runners, plan):
    fast, ref = runners
    assert fast.backend.name == "kernels" and isinstance(ref.backend, TorchBackend)
    ids = torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(0))
    caches = [r.new_cache(64) for r in runners]
    pos = torch.arange(15)
    out = [r.forward(ids[:15], pos, pos, c, plan) for r, c in zip(runners, caches)]  # prefill-sized forward
    torch.testing.assert_close(out[0], out[1], rtol=1e-4, atol=1e-4)
    for c in caches:
        c.length = 15
    tree = _tree_inputs(15)
    out = [r.forward(ids[15:], tree[0], tree[1], c, plan, tree[2], tree[3]) for r, c in zip(runners, caches)]
    torch.testing.assert_close(out[0], out[1], rtol=1e-4, atol=1e-4)
    assert torch.equal(out[0].argmax(-1), out[1].argmax(-1))


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: p.name)
def test_a_fused_layer_call_is_bitwise_the_ops_one_by_one(runners, plan, monkeypatch):
    """layer.cpp runs a decoder layer's kernel ops in one call: the same logits, bit for bit, as calling them
    from Python (prefill-sized and tree forwards, every family's norms, skipped sub-layers, int8 weights)."""
    fast = runners[0]
    ids = torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(1))
    tree = _tree_inputs(15)

    def logits() -> list[torch.Tensor]:
        cache = fast.new_cache(64)
        pos = torch.arange(15)
        first = fast.forward(ids[:15], pos, pos, cache, plan)
        cache.length = 15
        return [first, fast.forward(ids[15:], tree[0], tree[1], cache, plan, tree[2], tree[3])]

    calls = []
    original = type(fast.backend).layer
    monkeypatch.setattr(type(fast.backend), "layer", lambda self, *a: calls.append(1) or original(self, *a))
    fused = logits()
    assert calls and all(lw.kernel for lw in fast.weights_for(plan).layers)  # the fused call ran
    monkeypatch.setattr(type(fast.backend), "layer", lambda self, *a: False)
    for got, want in zip(fused, logits()):
        assert torch.equal(got, want)


def test_long_inputs_use_the_torch_path_and_agree(runners, monkeypatch):
    fast, ref = runners
    calls = []
    linear = fast.torch_backend.linear
    monkeypatch.setattr(fast.torch_backend, "linear", lambda *a, **k: calls.append(1) or linear(*a, **k))
    n = MAX_KERNEL_ROWS + 8
    ids = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(n)
    out = [r.forward(ids, pos, pos, r.new_cache(n + 4), prefill=True) for r in runners]
    assert calls  # a long prefill of fp32 weights ran on the torch backend (MKL's GEMM) ...
    torch.testing.assert_close(out[0], out[1], rtol=1e-4, atol=1e-4)
    calls.clear()
    fast.forward(ids[:8], pos[:8], pos[:8], fast.new_cache(12), prefill=True)
    assert not calls  # ... a short one on the kernels


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_rope_table_rows_are_the_rotary_modules_own_values(family):
    """The adapter looks RoPE up in tables the HF rotary module computed once: every row is bitwise what the
    module gives for that position alone, whatever the number of rows; the table grows on demand."""
    from casspec.runtime.adapter import _half, make_adapter

    adapter = make_adapter(tiny_model(family), None)
    h = torch.zeros(1, 8)
    for m in (1, 5, 64):
        positions = torch.randint(0, 3000, (m,), generator=torch.Generator().manual_seed(m))
        for kind, (cos, sin) in adapter.rope(h, positions).items():
            args = (kind,) if family == "gemma3" else ()
            want = _half(*adapter.rotary(h[None], positions[None], *args))
            assert torch.equal(cos, want[0]) and torch.equal(sin, want[1])
    assert adapter._rope_len >= 3000
