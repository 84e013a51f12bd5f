"""Low-bit draft formats (runtime/lowbit.py) and the FAMES-style mixed-precision level (drafters/fames.py)."""
from __future__ import annotations

import gguf
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from casspec.api import Engine
from casspec.drafters import fames
from casspec.runtime import kernels, lowbit
from casspec.runtime.adapter import make_adapter
from casspec.runtime.weights import make_proj
from casspec.testing import tiny_model, tiny_tokenizer
from casspec.testing_gguf import load_native, write_gguf

LOW = [lowbit.Q2_1, lowbit.Q3_1]
needs_kernels = pytest.mark.skipif(not kernels.available(), reason="needs casspec's CPU kernels (x86-64 AVX2)")


def _minmax_error(w: torch.Tensor, bits: int) -> torch.Tensor:  # [N] squared error of plain min-max blocks
    g = w.reshape(w.shape[0], -1, 32)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    m, d = lo.half().float(), ((hi - lo) / (2**bits - 1)).half().float()
    q = ((g - m) / d).round().clamp(0, 2**bits - 1)
    return (d * q + m - g).square().sum((-1, -2))


@pytest.mark.parametrize("qtype", LOW, ids=lowbit.name)
def test_blocks_decode_to_the_searched_range_and_never_worse_than_min_max(qtype):
    w = torch.randn(9, 256, generator=torch.Generator().manual_seed(1)) * 0.05
    blocks = lowbit.quantize(w, qtype)
    assert blocks.shape == (9, 256 // 32 * lowbit.BLOCK_BYTES[qtype]) and blocks.dtype == torch.uint8
    got = lowbit.dequantize(blocks, qtype, 256)
    err = (got - w).square().sum(-1)
    assert bool((err <= _minmax_error(w, lowbit.BITS[qtype]) * (1 + 1e-5) + 1e-12).all())
    assert float(err.sum() / w.square().sum()) < (0.2 if qtype == lowbit.Q2_1 else 0.05)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 7), min_size=32, max_size=32), st.floats(0.01, 2.0), st.floats(-1.0, 1.0))
def test_exactly_representable_blocks_round_trip(q, d, m):
    """Weights on a Q3_1 grid d * q + m (d, m fp16) spanning all 8 levels decode to themselves."""
    d16, m16 = torch.tensor(d).half().float(), torch.tensor(m).half().float()
    qs = torch.tensor([0, 7] + q[2:], dtype=torch.float32)
    w = (d16 * qs + m16)[None]  # [1, 32]
    got = lowbit.dequantize(lowbit.quantize(w, lowbit.Q3_1), lowbit.Q3_1, 32)
    torch.testing.assert_close(got, w, rtol=0, atol=float(d16) * 1e-3)


@needs_kernels
@pytest.mark.parametrize("qtype", LOW, ids=lowbit.name)
def test_kernels_decode_casspec_formats_bit_identically(qtype):
    ops = kernels.module()
    k, n = 512, 37
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(2)) * 0.05
    blocks = lowbit.quantize(w, qtype)
    dense = lowbit.dequantize(blocks, qtype, k)
    assert torch.equal(ops.dequantize_rows(blocks, qtype, k, None), dense)
    tiled = make_proj([dense], tile=True)
    for m in (1, 2, 3, 4, 5, 8, 33):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        got = ops.native_linear(x, [blocks], [qtype], None, None, 0.0, 0, None, False)
        assert torch.equal(got, ops.linear(x, tiled.tiled, None, None, 0, None, None, 0.0, n, 0, None)), m
        a8 = ops.native_linear(x, [blocks], [qtype], None, None, 0.0, 0, None, True)  # int8 activations: close
        torch.testing.assert_close(a8, x @ dense.T, rtol=0.05, atol=0.05 * float((x @ dense.T).abs().max()))


@needs_kernels
@pytest.mark.parametrize("act8", [1, 2], ids=["fastest", "portable"])
@pytest.mark.parametrize("qtype", LOW, ids=lowbit.name)
def test_activation_quantized_kernels_are_int8_rows_times_casspec_formats(qtype, act8):
    """The a8 view of Q2_1 / Q3_1 (built four rows at a time): each input row quantized per 32 values, times the
    exact blocks, with AVX-VNNI where the CPU has it (1) and without (2)."""
    ops = kernels.module()
    k, n = 512, 37
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(3)) * 0.05
    blocks = lowbit.quantize(w, qtype)
    dense = lowbit.dequantize(blocks, qtype, k)
    for m in (1, 2, 5, 8):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        groups = x.reshape(m, k // 32, 32)
        d = groups.abs().amax(-1, keepdim=True) / 127
        xq = (torch.round(groups / d) * d).reshape(m, k)
        got = ops.native_linear(x, [blocks], [qtype], None, None, 0.0, 0, None, act8)
        torch.testing.assert_close(got, xq @ dense.T, rtol=1e-4, atol=1e-4)


def _sens() -> tuple[dict, dict, dict, dict]:
    t = lowbit.CANDIDATES
    sens = {"a": {fames.KEEP: 0.0, t[0]: 0.001, t[1]: 0.01, t[2]: 0.05, t[3]: 0.5},
            "b": {fames.KEEP: 0.0, t[0]: 0.0001, t[1]: 0.002, t[2]: 0.004, t[3]: 0.02}}
    costs = {t[0]: 3.0, t[1]: 2.0, t[2]: 2.5, t[3]: 1.0}
    return sens, {"a": 4.0, "b": 4.0}, {"a": 1, "b": 1}, costs


@settings(max_examples=40, deadline=None)
@given(st.floats(0.0, 1.0))
def test_choice_meets_the_accuracy_budget_and_costs_less_with_more_room(max_kl):
    sens, own, weights, costs = _sens()
    mixed = fames.choose(sens, own, weights, costs, max_kl)
    assert mixed.kl <= max_kl + 1e-12
    assert mixed.kl == pytest.approx(sum(sens[k][t] for k, t in mixed.formats.items()))
    looser = fames.choose(sens, own, weights, costs, max_kl * 2 + 0.01)
    assert looser.cost <= mixed.cost + 1e-12


def test_choice_extremes():
    sens, own, weights, costs = _sens()
    assert set(fames.choose(sens, own, weights, costs, 0.0).formats.values()) == {fames.KEEP}
    cheapest = fames.choose(sens, own, weights, costs, 10.0)
    assert set(cheapest.formats.values()) == {lowbit.Q2_1} and cheapest.cost == pytest.approx(0.25)


def test_fisher_estimate_ranks_coarser_formats_as_more_harmful():
    model = tiny_model("llama")
    fish = fames.fisher(model, [list(range(3, 40)), list(range(40, 70))])
    assert all(f.shape == m.weight.shape and bool((f >= 0).all()) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) for f in [fish[n]])
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # the model is left as it was
    sens = fames.sensitivities(model, fish, make_adapter(model).module_keys(), None)
    assert set(sens) == {"head"} | {f"{i}.{p}" for i in range(model.config.num_hidden_layers)
                                    for p in ("qkv", "o", "gate_up", "down")}
    for s in sens.values():
        assert s[fames.KEEP] == 0.0 and s[lowbit.Q8_0] <= s[lowbit.Q4_0] <= s[lowbit.Q2_1]


@needs_kernels
def test_lowbit_levels_are_lossless_on_a_gguf_target(tmp_path, capsys):
    model = tiny_model("llama")
    skeleton, source = load_native(model, write_gguf(model, tmp_path / "m.gguf", gguf.GGMLQuantizationType.Q4_1))
    engine = Engine(skeleton, tiny_tokenizer(), name="native", source=source, hierarchy=("lowbit", "lowbitv", "pld"),
                    cache_dir=tmp_path / "cache")
    low = engine.runner.weights_for(engine.pool.get("lowbit").plan)
    assert all(p.act8 for p in low.named_projections().values())
    assert list((tmp_path / "cache" / "lowbit").glob("*.json"))  # the choice is cached
    assert "mixed-precision draft formats" in capsys.readouterr().err  # named before it is made
    prompt = "abc abc abd abc abc abd abc"
    want = engine.generate(prompt, method="ar", max_new_tokens=20).token_ids
    for method in ("casspec", "self", "vc"):
        assert engine.generate(prompt, method=method, max_new_tokens=20).token_ids == want, method
