"""Tests for casspec.runtime.loading: name resolution, errors, and the GGUF -> safetensors cache."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from casspec.errors import CasspecError, InvalidRequestError, ModelNotFoundError
from casspec.runtime import loading
from casspec.runtime.loading import LoadedModel, load_model, model_cache_dir

TINY_VOCAB = ["<unk>", "<s>", "</s>"] + [chr(ord("a") + i) for i in range(26)] + ["ab"]


def _make_hf_dir(folder: Path) -> Path:
    """Save a tiny random-weight Llama and a word-level tokenizer as an HF model directory."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(TINY_VOCAB)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tok.save_pretrained(folder)
    return folder


def _make_gguf(path: Path) -> Path:
    """Write a tiny fp32 llama GGUF (tied embeddings, byte-level BPE tokenizer, chat template)."""
    import gguf

    hidden, layers, ffn, vocab, heads, kv_heads = 16, 2, 32, 64, 2, 1
    head_dim = hidden // heads
    tokens = TINY_VOCAB + [f"x{i}" for i in range(vocab - len(TINY_VOCAB))]
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (vocab - 3))
    w.add_token_scores([0.0] * vocab)
    w.add_token_merges(["a b"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")

    def rand(name: str, *shape: int) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))

    rand("token_embd.weight", vocab, hidden)
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        rand(f"blk.{i}.attn_q.weight", hidden, hidden)
        rand(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        rand(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        rand(f"blk.{i}.attn_output.weight", hidden, hidden)
        rand(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        rand(f"blk.{i}.ffn_up.weight", ffn, hidden)
        rand(f"blk.{i}.ffn_down.weight", hidden, ffn)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_hf_dir(tmp_path_factory.mktemp("hf") / "tiny-llama")


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_gguf(tmp_path_factory.mktemp("gguf") / "tiny-model.gguf")


def _logits(lm: LoadedModel, text: str = "a b ab c") -> torch.Tensor:
    ids = lm.tokenizer(text, return_tensors="pt").input_ids
    with torch.inference_mode():
        return lm.model(ids).logits


def _gguf_logits(gguf: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the GGUF loaded directly by transformers (the reference for the converted copy)."""
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    with torch.inference_mode():
        return ref.eval()(ids).logits


def _is_tied(model: torch.nn.Module) -> bool:
    return model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_unknown_name_lists_known_names(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError) as err:
        load_model("no-such-model", cache_dir=str(tmp_path))
    msg = str(err.value)
    assert "smollm2" in msg and "gemma3-270m" in msg and "\n" not in msg
    assert isinstance(err.value, CasspecError) and isinstance(err.value, ValueError)


@pytest.mark.parametrize("spec", ["/no/such/dir", "./missing-model", "missing.gguf", "~/nope/a/b"])
def test_nonexistent_path(spec: str, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no such file or directory"):
        load_model(spec, cache_dir=str(tmp_path))


def test_empty_name(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="known names"):
        load_model("  ", cache_dir=str(tmp_path))


def test_hub_id_fails_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as err:
        load_model("casspec-test-nonexistent-org/no-such-model", cache_dir=str(tmp_path))
    assert time.perf_counter() - start < 10
    assert "casspec-test-nonexistent-org/no-such-model" in str(err.value)
    assert "\n" not in str(err.value)


def test_hub_unreachable_message(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(loading, "_hub_unreachable", lambda endpoint, timeout: "ConnectError: no route")
    with pytest.raises(ModelNotFoundError, match=r"hub is unreachable \(ConnectError: no route\)"):
        load_model("org/name", cache_dir=str(tmp_path))


def test_hub_offline_mode(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(loading, "_hub_unreachable", lambda *a: pytest.fail("probed the hub offline"))
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE"):
        load_model("org/name", cache_dir=str(tmp_path))


def test_hub_probe_reports_unreachable_endpoint() -> None:
    start = time.perf_counter()
    problem = loading._hub_unreachable("http://127.0.0.1:9", 1.0)  # discard port: refused at once
    assert problem and time.perf_counter() - start < 3


@pytest.mark.parametrize("dtype", ["float64", "int8", "", "fp33"])
def test_bad_dtype(dtype: str, hf_dir: Path) -> None:
    with pytest.raises(InvalidRequestError, match="dtype"):
        load_model(str(hf_dir), dtype=dtype)


@pytest.mark.parametrize("device", ["gpu7", "", "meta", "cpu:x"])
def test_bad_device(device: str, hf_dir: Path) -> None:
    with pytest.raises(InvalidRequestError, match="device"):
        load_model(str(hf_dir), device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_unavailable(hf_dir: Path) -> None:
    with pytest.raises(InvalidRequestError, match="CUDA is not available"):
        load_model(str(hf_dir), device="cuda")


def test_model_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    target = tmp_path / "sub" / "cache"
    monkeypatch.setenv("CASSPEC_CACHE", str(target))
    assert model_cache_dir() == target and target.is_dir()
    monkeypatch.delenv("CASSPEC_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert model_cache_dir() == tmp_path / ".cache" / "casspec"


def test_load_hf_dir(hf_dir: Path) -> None:
    lm = load_model(str(hf_dir))
    assert lm.name == "tiny-llama" and lm.path == str(hf_dir)
    assert not lm.has_chat_template
    assert lm.model.dtype == torch.float32 and not lm.model.training
    assert lm.model.config._attn_implementation == "sdpa"
    assert _is_tied(lm.model)
    assert _logits(lm).shape == (1, 4, 64)


def test_load_hf_dir_bf16(hf_dir: Path) -> None:
    assert load_model(str(hf_dir), dtype="bf16").model.dtype == torch.bfloat16


def test_dir_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(str(tmp_path))


def test_file_not_gguf(tmp_path: Path) -> None:
    bogus = tmp_path / "weights.bin"
    bogus.write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="not a .gguf file"):
        load_model(str(bogus))


def test_garbage_gguf(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelNotFoundError, match="cannot load GGUF"):
        load_model(str(bogus), cache_dir=str(tmp_path / "cache"))
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_gguf_reference_converted_once_and_identical(
    gguf_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The HF reference model of a GGUF file (the `hf` peers) is converted once and equals transformers'."""
    lm = loading.load_gguf_converted(gguf_file, "tiny-model", tmp_path)
    converted = Path(lm.path)
    assert converted.parent == tmp_path / "models" and converted.name.startswith("tiny-model-")
    assert lm.name == "tiny-model" and lm.has_chat_template and lm.gguf_path == gguf_file
    assert lm.model.generation_config.eos_token_id == 2 and _is_tied(lm.model)
    ids = lm.tokenizer("a b ab c", return_tensors="pt").input_ids
    assert torch.equal(_logits(lm), _gguf_logits(gguf_file, ids))
    monkeypatch.setattr(loading, "_convert_gguf", lambda *a: pytest.fail("converted twice"))
    again = loading.load_gguf_converted(gguf_file, "tiny-model", tmp_path)
    assert again.path == lm.path and torch.equal(_logits(again), _logits(lm))
    assert not list((tmp_path / "models").glob(".tmp-*"))


def test_gguf_loads_in_place_without_conversion(
    gguf_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the CPU a GGUF file is read in place: only its config and tokenizer are cached, no weights."""
    from casspec.api import Engine
    from casspec.runtime import kernels

    if not kernels.available():
        pytest.skip("needs casspec's CPU kernels")
    lm = load_model(str(gguf_file), cache_dir=str(tmp_path))
    assert lm.source is not None and lm.gguf_path == gguf_file and lm.has_chat_template
    assert lm.model.generation_config.eos_token_id == 2
    assert all(p.device.type == "meta" for p in lm.model.parameters())  # no fp32 copy in memory
    written = sorted(f.name for f in (tmp_path / "models").rglob("*") if f.is_file())
    assert written and not [f for f in written if f.endswith((".safetensors", ".bin", ".pt", ".gguf"))]
    assert sum(f.stat().st_size for f in (tmp_path / "models").rglob("*") if f.is_file()) < 1_000_000
    engine = Engine(lm.model, lm.tokenizer, lm.name, source=lm.source, prepare=False)
    ids = lm.tokenizer("a b ab c", return_tensors="pt").input_ids[0]
    cache = engine.runner.new_cache(16)
    n = torch.arange(len(ids))
    logits = engine.runner.forward(ids, n, n, cache)
    torch.testing.assert_close(logits, _gguf_logits(gguf_file, ids[None])[0], rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(loading, "_save_gguf_metadata", lambda *a: pytest.fail("metadata parsed twice"))
    assert load_model(str(gguf_file), cache_dir=str(tmp_path)).source is not None


@pytest.mark.parametrize("builder", ["_convert_gguf", "_save_gguf_metadata"])
def test_interrupted_conversion_leaves_no_cache(
    gguf_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, builder: str
) -> None:
    def broken(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(loading, builder, broken)
    with pytest.raises(KeyboardInterrupt):
        if builder == "_convert_gguf":
            loading.load_gguf_converted(gguf_file, "tiny-model", tmp_path)
        else:
            loading.load_gguf_native(gguf_file, "tiny-model", tmp_path)
    assert list((tmp_path / "models").iterdir()) == []


# ---------------------------------------------------------------- real models (slow)


@pytest.mark.slow
def test_smollm2_real(tmp_path: Path) -> None:
    start = time.perf_counter()
    lm = load_model(None, cache_dir=str(tmp_path))
    first = time.perf_counter() - start
    assert lm.name == "smollm2" and lm.has_chat_template and lm.source is not None
    assert lm.tokenizer.convert_ids_to_tokens(lm.model.generation_config.eos_token_id) == "<|im_end|>"
    start = time.perf_counter()
    again = load_model("smollm2", cache_dir=str(tmp_path))
    second = time.perf_counter() - start
    print(f"\nsmollm2: first load {first:.1f} s, cached load {second:.2f} s")
    assert again.path == lm.path and second < 10


@pytest.mark.slow
def test_gemma3_real(tmp_path: Path) -> None:
    start = time.perf_counter()
    lm = load_model("gemma3-270m", cache_dir=str(tmp_path))
    first = time.perf_counter() - start
    assert lm.name == "gemma3-270m" and not lm.has_chat_template and lm.source is not None
    assert lm.tokenizer.convert_ids_to_tokens(lm.model.generation_config.eos_token_id) == "<eos>"
    start = time.perf_counter()
    again = load_model("GEMMA3-270M", cache_dir=str(tmp_path))
    second = time.perf_counter() - start
    print(f"\ngemma3-270m: first load {first:.1f} s, cached load {second:.2f} s")
    assert again.path == lm.path and second < 20


def test_native_tokenizer_read_from_file_matches_the_family_class(tmp_path: Path) -> None:
    """The GGUF path builds the tokenizer straight from its tokenizer.json (far less memory than the family
    class); it must encode and decode exactly as transformers' AutoTokenizer does for the same file."""
    from transformers import AutoTokenizer

    gguf = loading._smollm2_gguf()
    lm = loading.load_gguf_native(gguf, "smollm2", tmp_path)
    ref = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    texts = ["Hello world, how are you?", "  two  spaces\n\nand\ttabs", "日本語 🤖 émoji", "def f(x):\n    return x**2",
             "<|im_start|>user\nhi<|im_end|>"]
    for text in texts:
        ids = lm.tokenizer(text).input_ids
        assert ids == ref(text).input_ids
        assert lm.tokenizer.decode(ids) == ref.decode(ids)
    assert lm.tokenizer.chat_template == ref.chat_template and len(lm.tokenizer) == len(ref)
    assert lm.tokenizer.all_special_ids == ref.all_special_ids
