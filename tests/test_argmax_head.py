"""The argmax-exact head (runtime/argmax_head.py): greedy tokens from int8-activation logits, a bound and a few
exact rows are the full fp32 head's, ties included, and nothing else about decoding changes."""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from casspec.api import Engine
from casspec.methods import METHODS
from casspec.runtime import kernels
from casspec.runtime.argmax_head import ArgmaxHead, _round_up_half, rounding_factor
from casspec.runtime.gguf_file import NativeTensor
from casspec.runtime.weights import make_proj
from casspec.scheduler import calibrate
from casspec.scheduler.latency import GREEDY_VERIFY, ForwardTimes
from casspec.testing import tiny_model, tiny_tokenizer
from casspec.testing_gguf import load_native, write_gguf

pytestmark = pytest.mark.skipif(not kernels.available(), reason="needs casspec's CPU kernels (x86-64 AVX2)")
Q8_0 = gguf.GGMLQuantizationType.Q8_0


def _head(v: int, k: int, x: np.ndarray, seed: int = 0) -> ArgmaxHead:
    """A Q8_0 head of v tokens whose rows 1, 2 and 3 are row 0 (exact ties) and whose rows 0 and 4-199 score
    x [k] (a normalized input row) almost alike and above the rest (near-ties that int8 activations reorder)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((v, k)) * rng.uniform(0.02, 0.2, (v, 1))
    top = 1.5 * np.abs(w @ x).max()
    near = np.r_[0, 4:200]
    w[near] += ((top + 1e-3 * rng.standard_normal(len(near))) - w[near] @ x)[:, None] * x / (x @ x)
    w[1:4] = w[0]
    w = w.astype(np.float32)
    blocks = torch.from_numpy(np.ascontiguousarray(gguf.quants.quantize(w, Q8_0)).view(np.uint8).reshape(v, -1))
    head = make_proj([NativeTensor(blocks, int(Q8_0), (v, k))], tile=True)
    return ArgmaxHead(head, kernels.module(), max_rows=64)


def _full(head: ArgmaxHead, h: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    return kernels.module().native_linear(h, head.head.blocks, head.head.qtypes, None, norm, 1e-6, 0, None, 0)


@pytest.mark.parametrize("k", [128, 576, 640, 2048])  # 4 groups of 1 block; 18, 20, 64 blocks in uneven groups
def test_candidates_hold_every_maximum_with_the_full_heads_values(k):
    flips = 0  # rows whose int8-activation argmax is not the target's (without the bound: a wrong token)
    for seed in range(k, k + 4):
        gen = torch.Generator().manual_seed(seed)
        norm = torch.rand(k, generator=gen) + 0.5
        h = torch.randn(8, k, generator=gen) * torch.rand(1, k, generator=gen) * 4  # [8, k], uneven column scales
        x0 = (h[0].double() * torch.rsqrt(h[0].double().pow(2).mean() + 1e-6) * norm.double()).numpy()
        head = _head(6000, k, x0, seed=seed)
        for m in (1, 2, 5, 8):
            full = _full(head, h[:m], norm)  # [m, V]
            got = head.logits(h[:m], norm, 1e-6, lambda t: t)
            kept = torch.isfinite(got)
            assert torch.equal(got[kept], full[kept])  # bitwise: the target's own kernel on the candidate rows
            assert torch.equal(got.argmax(dim=1), full.argmax(dim=1))
            top = full == full.amax(dim=1, keepdim=True)
            assert kept[top].all()  # every maximum is a candidate, so the first argmax is the full head's
            if k <= 640:  # and few others are: the bound is tight enough to pay (at K = 2048 the random rows'
                assert kept.sum(dim=1).max() < 6000 // 16  # union outgrows MAX_SHARE: the full head, exact too)
            assert kept[0, :4].all()  # the tied rows 0-3 are kept together
            l_hat = head.ops.native_linear(h[:m], head.a8_head.blocks, head.a8_head.qtypes, None, norm, 1e-6, 0,
                                           None, 1)
            flips += int((l_hat.argmax(dim=1) != full.argmax(dim=1)).sum())
    assert flips > 0


def test_the_rounding_term_grows_with_the_row_length():
    """Each side's fp32 sum over K products may be off by ~K 2^-24 of its sum of |products|: a fixed 1e-4 covers
    both only up to K ~ 640 (SmolLM2 576, Gemma 640); a 2048-wide head needs more."""
    assert rounding_factor(576) == rounding_factor(640) == 1e-4
    assert rounding_factor(2048) >= 2 * 2048 * 2.0 ** -24
    assert rounding_factor(4096) == 2 * rounding_factor(2048)


def test_more_rows_than_pay_take_the_full_head():
    head = _head(500, 128, np.ones(128))
    norm, h = torch.ones(128), torch.randn(3, 128)
    assert torch.isinf(head.logits(h, norm, 1e-6, lambda t: t)).any()  # -inf outside the candidates
    head.max_rows = 2
    torch.testing.assert_close(head.logits(h, norm, 1e-6, lambda t: t), _full(head, h, norm))
    assert 0 <= head.rows_that_pay() <= 16


def test_rows_that_are_not_finite_take_the_full_head():
    head = _head(500, 128, np.ones(128))
    norm = torch.ones(128)
    h = torch.randn(2, 128)
    h[1, 7] = float("nan")
    torch.testing.assert_close(head.logits(h, norm, 1e-6, lambda t: t), _full(head, h, norm), equal_nan=True)


def test_the_fp16_bound_table_is_never_below_the_sums():
    t = torch.rand(10000) * torch.logspace(-3, 3, 10000)
    assert (_round_up_half(t.clone()).float() >= t).all()


def test_only_q8_0_heads_with_four_blocks_take_the_bound():
    q8 = make_proj([NativeTensor(torch.zeros(10, 34 * 4, dtype=torch.uint8), int(Q8_0), (10, 128))], tile=True)
    small = make_proj([NativeTensor(torch.zeros(10, 34 * 2, dtype=torch.uint8), int(Q8_0), (10, 64))], tile=True)
    q4 = make_proj([NativeTensor(torch.zeros(10, 20 * 4, dtype=torch.uint8), 3, (10, 128))], tile=True)
    assert ArgmaxHead.supports(q8) and not ArgmaxHead.supports(small) and not ArgmaxHead.supports(q4)


def test_greedy_decoding_is_unchanged_and_uses_the_bound(tmp_path, monkeypatch):
    model = tiny_model("llama", hidden_size=128, intermediate_size=256)
    skeleton, source = load_native(model, write_gguf(model, tmp_path / "m.gguf", Q8_0))
    engine = Engine(skeleton, tiny_tokenizer(), name="native", source=source)
    head = engine.runner.argmax_head()
    assert head is not None and 0 <= head.max_rows <= 16  # timed against the full head at load
    head.max_rows = 64  # whatever a tiny head measures: every verify takes it
    calls = []
    logits = ArgmaxHead.logits
    monkeypatch.setattr(ArgmaxHead, "logits", lambda self, *a: calls.append(1) or logits(self, *a))
    prompt = "the quick brown fox jumps over the lazy dog; the quick brown"
    for method in METHODS:
        engine.runner.use_argmax_head = False
        want = engine.generate(prompt, method=method, max_new_tokens=24).token_ids
        engine.runner.use_argmax_head = True
        before = len(calls)
        assert engine.generate(prompt, method=method, max_new_tokens=24).token_ids == want, method
        assert len(calls) > before, method
    before = len(calls)  # sampling and logprobs read the whole distribution: the full head
    sampled = engine.generate(prompt, method="casspec", max_new_tokens=8, temperature=0.7, seed=1)
    logprobs = engine.generate(prompt, method="casspec", max_new_tokens=8, logprobs=2)
    assert len(calls) == before and len(sampled.token_ids) == 8 and len(logprobs.logprobs or []) == 8


def test_greedy_verifies_are_timed_and_priced_as_the_argmax_head(tmp_path, monkeypatch):
    """A greedy verify (argmax head) and a sampled one (full head) cost differently: each is calibrated, timed and
    predicted under its own key, so DyTC prices a greedy tree at what greedy verification costs."""
    model = tiny_model("llama", hidden_size=128, intermediate_size=256)
    skeleton, source = load_native(model, write_gguf(model, tmp_path / "m.gguf", Q8_0))
    engine = Engine(skeleton, tiny_tokenizer(), name="native", source=source)
    latency = engine.pool.latency()
    assert latency.knows(GREEDY_VERIFY) and latency.knows("full")
    keys: list[str] = []
    record = ForwardTimes.record
    monkeypatch.setattr(ForwardTimes, "record", lambda self, plan, *a: keys.append(plan) or record(self, plan, *a))
    prompt = "the quick brown fox jumps over the lazy dog; the quick brown"
    engine.generate(prompt, method="casspec", max_new_tokens=8)
    assert GREEDY_VERIFY in keys and "full" not in keys
    keys.clear()
    engine.generate(prompt, method="casspec", max_new_tokens=8, temperature=0.7, seed=1)
    engine.generate(prompt, method="casspec", max_new_tokens=8, logprobs=2)
    assert "full" in keys and GREEDY_VERIFY not in keys
    dytc = engine.pool.dytc()
    assert dytc._t_verify(4, 64) == latency.predict(GREEDY_VERIFY, 4, 64)
    assert dytc._t_verify(4, 64, True) >= latency.predict("full", 4, 64)
    engine.runner.use_argmax_head = False  # no argmax head: greedy verifies are full ones again
    keys.clear()
    engine.generate(prompt, method="ar", max_new_tokens=4)
    assert "full" in keys and GREEDY_VERIFY not in keys


def test_max_rows_is_kept_with_the_latency_calibration(tmp_path, monkeypatch):
    """The rows that take the argmax head are timed once per machine, beside the latency calibration measured
    under them: a later load reads both and times nothing; without the kept count (or with a broken file) both
    the count and the greedy verify's curve are measured again."""
    model = tiny_model("llama", hidden_size=128, intermediate_size=256)
    skeleton, source = load_native(model, write_gguf(model, tmp_path / "m.gguf", Q8_0))
    cache = tmp_path / "cache"
    first = Engine(skeleton, tiny_tokenizer(), name="native", source=source, cache_dir=cache, progress=False)
    rows_file = first.pool._argmax_rows_path()
    assert rows_file is not None and rows_file.exists()
    assert json.loads(rows_file.read_text()) == {"max_rows": first.runner.argmax_head().max_rows}
    rows_file.write_text(json.dumps({"max_rows": 5}))
    monkeypatch.setattr(ArgmaxHead, "rows_that_pay", lambda self: pytest.fail("timed again"))
    calibrated = []
    monkeypatch.setattr(calibrate, "calibrate", lambda runner, plans, *a, **k: calibrated.append(set(plans)))
    second = Engine(skeleton, tiny_tokenizer(), name="native", source=source, cache_dir=cache, progress=False)
    assert second.runner.argmax_head().max_rows == 5 and calibrated == []
    rows_file.write_text("{broken")
    monkeypatch.undo()
    monkeypatch.setattr(calibrate, "calibrate", lambda runner, plans, *a, **k: calibrated.append(set(plans)))
    third = Engine(skeleton, tiny_tokenizer(), name="native", source=source, cache_dir=cache, progress=False)
    assert calibrated == [{GREEDY_VERIFY}]  # the greedy verify measured again, under the count timed now
    assert json.loads(rows_file.read_text()) == {"max_rows": third.runner.argmax_head().max_rows}
