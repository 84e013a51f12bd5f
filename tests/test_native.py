"""The target at its own precision: GGUF blocks and bf16 weights read in place by the CPU kernels."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from casspec.api import Engine
from casspec.methods import METHODS
from casspec.runtime import kernels
from casspec.runtime.weights import make_proj
from casspec.testing import tiny_model, tiny_tokenizer
from casspec.testing_gguf import RANDOM_BLOCKS, dequantized_model, load_native, write_gguf

T = gguf.GGMLQuantizationType
FORMATS = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q4_K, T.Q6_K, T.F16, T.BF16]
pytestmark = pytest.mark.skipif(not kernels.available(), reason="needs casspec's CPU kernels (x86-64 AVX2)")


def _blocks(qtype: T, n: int, k: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    if qtype in RANDOM_BLOCKS:
        from casspec.testing_gguf import _random_blocks

        return torch.from_numpy(_random_blocks((n, k), qtype, rng))
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.quantize(w, qtype)).view(np.uint8).reshape(n, -1))


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
def test_dequantize_is_bit_identical_to_gguf_py(qtype):
    blocks = _blocks(qtype, 37, 512)
    want = gguf.quants.dequantize(blocks.numpy(), qtype).reshape(37, 512).astype(np.float32)
    got = kernels.module().dequantize_rows(blocks, int(qtype), 512, None).numpy()
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    ids = torch.tensor([36, 0, 5, 5])
    assert torch.equal(kernels.module().dequantize_rows(blocks, int(qtype), 512, ids), torch.from_numpy(want)[ids])


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
@pytest.mark.parametrize("n", [1, 6, 37])  # row counts that are not a multiple of the 4-row tile
def test_native_linear_equals_fp32_linear_on_dequantized_weights(qtype, n):
    ops = kernels.module()
    k = 512
    blocks = _blocks(qtype, n, k, seed=n)
    dense = ops.dequantize_rows(blocks, int(qtype), k, None)  # [n, k]
    tiled = make_proj([dense], tile=True)
    bias = torch.randn(n)
    for m in (1, 2, 3, 4, 5, 7, 8, 10, 13, 16, 33, 64):  # 9..16: balanced groups through the registers
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))  # seeded: the tolerance check is not flaky
        got = ops.native_linear(x, [blocks], [int(qtype)], bias, None, 0.0, 0, None, False)
        want = ops.linear(x, tiled.tiled, None, None, 0, bias, None, 0.0, n, 0, None)
        assert torch.equal(got, want), f"rows {m}"  # bitwise: same weights, same accumulation order
        torch.testing.assert_close(got, x @ dense.T + bias, rtol=1e-4, atol=1e-4)


def test_fused_parts_of_different_formats_and_glu():
    ops = kernels.module()
    k, f = 256, 64
    parts = [_blocks(T.Q5_0, 48, k, 1), _blocks(T.Q8_0, 16, k, 2), _blocks(T.Q4_K, 16, k, 3)]
    types = [int(T.Q5_0), int(T.Q8_0), int(T.Q4_K)]
    dense = torch.cat([ops.dequantize_rows(b, t, k, None) for b, t in zip(parts, types)])
    x, norm = torch.randn(5, k), torch.rand(k) + 0.5
    xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm
    torch.testing.assert_close(ops.native_linear(x, parts, types, None, norm, 1e-6, 0, None, False), xn @ dense.T,
                               rtol=1e-4, atol=1e-4)
    for gate_type in (T.Q4_1, T.Q8_0):  # same format: fused GLU tiles; different: through a temporary
        gu = [_blocks(gate_type, f, k, 4), _blocks(T.Q4_1, f, k, 5)]
        gd, ud = (ops.dequantize_rows(b, int(t), k, None) for b, t in zip(gu, (gate_type, T.Q4_1)))
        y = ops.native_linear(x, gu, [int(gate_type), int(T.Q4_1)], None, None, 0.0, 2, None, False)  # silu
        torch.testing.assert_close(y, torch.nn.functional.silu(x @ gd.T) * (x @ ud.T), rtol=1e-4, atol=1e-4)


def test_rows_of_the_wrong_size_are_refused():
    blocks = _blocks(T.Q8_0, 4, 64)  # rows of 64 weights
    with pytest.raises(RuntimeError, match="bytes"):
        kernels.module().native_linear(torch.randn(1, 96), [blocks], [int(T.Q8_0)], None, None, 0.0, 0, None, False)
    with pytest.raises(RuntimeError, match="multiple of the block size"):
        kernels.module().native_linear(torch.randn(1, 48), [blocks], [int(T.Q8_0)], None, None, 0.0, 0, None, False)
    with pytest.raises(RuntimeError, match="no kernel"):
        kernels.module().native_linear(torch.randn(1, 64), [blocks], [99], None, None, 0.0, 0, None, False)


def _native_engine(family: str, qtype: T, tmp_path) -> tuple[Engine, Engine, torch.nn.Module]:
    """(engine over the GGUF file read in place, fp32 engine over its dequantized values, that HF model)."""
    sizes = {"hidden_size": 256, "intermediate_size": 512} if qtype in RANDOM_BLOCKS else {}
    model = tiny_model(family, **sizes)
    path = write_gguf(model, tmp_path / f"{family}-{qtype.name}.gguf", qtype)
    skeleton, source = load_native(model, path)
    native = Engine(skeleton, tiny_tokenizer(), name="native", source=source)
    ref = dequantized_model(model, source)
    return native, Engine(ref, tiny_tokenizer(), name="dequantized"), ref


@pytest.mark.parametrize("family,qtype", [("llama", T.Q4_1), ("qwen2", T.Q8_0), ("gemma3", T.Q5_0),
                                          ("llama", T.Q4_0), ("llama", T.Q4_K), ("gemma3", T.Q6_K),
                                          ("qwen2", T.BF16)], ids=str)
def test_gguf_target_is_lossless_for_every_method(family, qtype, tmp_path):
    native, fp32, ref = _native_engine(family, qtype, tmp_path)
    assert native.runner.weights.head.kind == "native" and native.runner.weights.nbytes < fp32.runner.weights.nbytes
    prompt = "the quick brown fox jumps over the lazy dog; the quick brown"
    want = fp32.generate(prompt, method="ar", max_new_tokens=24).token_ids
    ids = torch.tensor([native.encode_prompt(prompt, chat=False)])
    hf = ref.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None)[0, ids.shape[1]:].tolist()
    assert want == hf[:len(want)]  # the dequantized fp32 engine is HF transformers' model
    for method in METHODS:
        assert native.generate(prompt, method=method, max_new_tokens=24).token_ids == want, method


def test_gguf_tensors_match_the_model_they_came_from(tmp_path):
    """Q/K rows un-permuted and Gemma norms restored: Q8_0 logits stay close to the original model's."""
    for family in ("llama", "gemma3"):
        model = tiny_model(family)
        _, source = load_native(model, write_gguf(model, tmp_path / f"{family}.gguf", T.Q8_0))
        ref = dequantized_model(model, source)
        ids = torch.arange(3, 40)[None]
        with torch.no_grad():
            a, b = model(ids).logits, ref(ids).logits
        assert (a - b).norm() < 0.05 * a.norm(), family  # a row permutation or a norm off by 1 is far off


def test_bf16_checkpoint_stays_at_two_bytes():
    model = tiny_model("llama").to(torch.bfloat16)
    engine = Engine(model, tiny_tokenizer(), name="bf16")
    w = engine.runner.weights
    assert w.head.formats == "BF16" and w.nbytes == sum(p.numel() * 2 for n, p in model.named_parameters()
                                                        if p.dim() == 2 and "embed" not in n)
    ref = tiny_model("llama").to(torch.bfloat16).float()  # the same values in fp32
    want = Engine(ref, tiny_tokenizer(), name="fp32").generate("hello world", method="ar", max_new_tokens=16)
    for method in ("ar", "casspec", "pld"):
        assert engine.generate("hello world", method=method, max_new_tokens=16).token_ids == want.token_ids


@pytest.mark.parametrize("act8", [1, 2], ids=["fastest", "portable"])
@pytest.mark.parametrize("rows", [1, 2, 5, 8])
@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
def test_activation_quantized_linear_is_int8_rows_times_the_blocks(qtype, rows, act8):
    """act8: each input row quantized per 32 values (scale max|x| / 127), then the exact block weights; the
    same with AVX-VNNI where the CPU has it (1) and without (2)."""
    ops = kernels.module()
    n, k = 37, 512
    blocks = _blocks(qtype, n, k, seed=3)
    dense = ops.dequantize_rows(blocks, int(qtype), k, None)
    x = torch.randn(rows, k)
    groups = x.reshape(rows, k // 32, 32)
    d = groups.abs().amax(-1, keepdim=True) / 127
    xq = (torch.round(groups / d) * d).reshape(rows, k)  # what the integer dot products see
    float_format = qtype in (T.F16, T.BF16)  # no integer view: the exact path
    want = x @ dense.T if float_format else xq @ dense.T
    for gate in (0, 2):
        if gate:
            parts, types = [blocks, blocks], [int(qtype)] * 2
            want_g = torch.nn.functional.silu(want) * want
            got = ops.native_linear(x, parts, types, None, None, 0.0, 2, None, act8)
            torch.testing.assert_close(got, want_g, rtol=1e-4, atol=1e-4)
        else:
            got = ops.native_linear(x, [blocks], [int(qtype)], None, None, 0.0, 0, None, act8)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_native_draft_levels_are_lossless_and_read_the_targets_blocks(tmp_path):
    """a8 / a8v / vocab drafts reuse the target's own blocks (no copy) and never change the output."""
    model = tiny_model("llama")
    skeleton, source = load_native(model, write_gguf(model, tmp_path / "m.gguf", T.Q4_1))
    engine = Engine(skeleton, tiny_tokenizer(), name="native", source=source, hierarchy=("a8v", "vocab", "a8", "pld"))
    assert engine.pool.hierarchy == ("a8v", "vocab", "a8", "pld")
    a8 = engine.runner.weights_for(engine.pool.get("a8").plan)
    assert a8.head.act8 and a8.head.blocks[0].data_ptr() == engine.runner.weights.head.blocks[0].data_ptr()
    assert engine.plan_weights("a8") == {"formats": "Q4_1 a8", "bytes": engine.runner.weights.nbytes}
    prompt = "abc abc abd abc abc abd abc"
    want = engine.generate(prompt, method="ar", max_new_tokens=20).token_ids
    for method in ("casspec", "casspec-chain", "self", "vc", "hc", "vchc", "tree"):
        assert engine.generate(prompt, method=method, max_new_tokens=20).token_ids == want, method


@pytest.mark.parametrize("family,qtype", [("gemma3", T.Q5_0), ("llama", T.Q4_K)], ids=str)
def test_a_fused_layer_call_over_blocks_is_bitwise_the_ops_one_by_one(family, qtype, tmp_path, monkeypatch):
    """layer.cpp over GGUF blocks (and the a8 draft's int8 activations): the logits of the ops called one by one."""
    from casspec.runtime.plans import FULL, ExecutionPlan

    runner = _native_engine(family, qtype, tmp_path)[0].runner
    ids = torch.randint(0, 200, (12,), generator=torch.Generator().manual_seed(2))

    def logits(plan: ExecutionPlan) -> torch.Tensor:
        cache = runner.new_cache(32)
        pos = torch.arange(12)
        return runner.forward(ids, pos, pos, cache, plan)

    for plan in (FULL, ExecutionPlan(weights="a8")):
        fused = logits(plan)
        assert all(lw.kernel for lw in runner.weights_for(plan).layers)
        with monkeypatch.context() as m:
            m.setattr(type(runner.backend), "layer", lambda self, *a: False)
            assert torch.equal(fused, logits(plan))


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
def test_rows_requested_ahead_change_no_output(qtype):
    """How far ahead a run of rows is requested (ops.run_ahead) moves reads, never results: 1-3 input rows (the
    runs), plain and GLU, int8 activations too, give the same bits at 0, 1 and 5 tiles ahead."""
    ops = kernels.module()
    k, f = 256, 40
    blocks, gu = _blocks(qtype, 37, k, 7), [_blocks(qtype, f, k, 8), _blocks(qtype, f, k, 9)]
    before = ops.run_ahead()
    try:
        for m in (1, 2, 3):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            outs = []
            for ahead in (0, 1, 5):
                assert ops.run_ahead(ahead) == ahead
                outs.append([ops.native_linear(x, [blocks], [int(qtype)], None, None, 0.0, 0, None, a8)
                             for a8 in (0, 1)] + [ops.native_linear(x, gu, [int(qtype)] * 2, None, None, 0.0, 2, None, 0)])
            assert all(torch.equal(a, b) for other in outs[1:] for a, b in zip(outs[0], other)), f"rows {m}"
        assert ops.run_ahead(-3) == 0  # clamped
    finally:
        ops.run_ahead(before)


def test_activation_quantization_mode_is_checked():
    blocks = _blocks(T.Q8_0, 4, 64)
    with pytest.raises(RuntimeError, match="act8 must be"):
        kernels.module().native_linear(torch.randn(1, 64), [blocks], [int(T.Q8_0)], None, None, 0.0, 0, None, 3)


@pytest.mark.skipif(not (kernels.available() and kernels.module().avx512_linear()),
                    reason="needs a CPU with AVX-512 (F, DQ, VL)")
@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
def test_avx512_rows_are_bitwise_the_avx2_rows(qtype):
    """The AVX-512 registers path (6-16 input rows, and 1-5 for the formats with a 512-bit pair decoder, two tiles at
    a time up to 3 rows, an odd tile alone) and its fp32 tile kernel over the decoded scratch (more rows) run each
    lane's FMA chain as the AVX2 path does: same bits, plain and GLU, whatever the row count."""
    ops = kernels.module()
    k, f = 256, 40
    blocks, gu = _blocks(qtype, 37, k, 7), [_blocks(qtype, f, k, 8), _blocks(qtype, f, k, 9)]
    try:
        for m in [*range(1, 19), 23, 40]:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            out = {}
            for on in (False, True):
                ops.avx512_linear(on)
                out[on] = (ops.native_linear(x, [blocks], [int(qtype)], None, None, 0.0, 0, None, 0),
                           ops.native_linear(x, gu, [int(qtype)] * 2, None, None, 0.0, 2, None, 0))
            assert all(torch.equal(a, b) for a, b in zip(out[False], out[True])), f"rows {m}"
    finally:
        ops.avx512_linear(True)
