"""Load-time and submit-time checks: a tokenizer that does not fit the embedding, prompt ids out of range,
RoPE settings the kernels do not reproduce, and CLI arguments, all refused with a message naming the
problem before any forward (or, for the CLI, before any model is loaded)."""
from __future__ import annotations

import pytest
from torch import nn

import casspec
from casspec import cli
from casspec.api import Engine
from casspec.errors import InvalidRequestError
from casspec.runtime.adapter import UnsupportedModelError
from casspec.runtime.runner import TargetRunner
from casspec.testing import tiny_model, tiny_tokenizer


def _refused(model) -> str:
    with pytest.raises(UnsupportedModelError) as err:
        TargetRunner(model, use_kernels=False)
    return str(err.value)


def test_tokenizer_larger_than_the_embedding_is_refused_naming_both_sizes():
    with pytest.raises(UnsupportedModelError, match=r"260 token ids.*200 rows"):
        Engine(tiny_model("llama", vocab_size=200), tiny_tokenizer(), prepare=False)


def test_prompt_ids_past_the_embedding_are_refused_before_any_forward():
    """A tokenizer with an added token the embedding has no row for loads; only prompts holding it fail."""
    tok = tiny_tokenizer()
    tok.add_tokens(["<|new|>"])  # id 260 of a 260-row embedding
    engine = Engine(tiny_model("llama"), tok, hierarchy=("int8", "pld"), prepare=False)
    calls = []  # forwards that saw the id (the latency calibration's own forwards do not count)
    embed = engine.runner.adapter.embed
    engine.runner.adapter.embed = lambda ids: calls.append(int(ids.max())) if int(ids.max()) >= 260 else embed(ids)
    with pytest.raises(InvalidRequestError, match=r"token id 260 .*260 rows"):
        engine.generate("hello <|new|> world", "ar", max_new_tokens=4)
    with pytest.raises(InvalidRequestError, match="token id 260"):
        engine.generate_batch(["hello <|new|>"], "ar", max_new_tokens=4)
    assert not calls
    assert len(engine.generate("hello world", "casspec", max_new_tokens=4).token_ids) == 4


def test_output_head_larger_than_the_embedding_is_refused():
    model = tiny_model("llama")
    model.lm_head = nn.Linear(64, 300, bias=False)
    assert "300" in _refused(model) and "260" in _refused(model)


@pytest.mark.parametrize("family, params, field", [
    ("llama", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ("qwen2", {"partial_rotary_factor": 0.25}, "partial_rotary_factor"),
    ("llama", {"rope_type": "mrope"}, "rope_type"),
    ("llama", {"mrope_section": [2, 2, 4]}, "mrope_section"),
])
def test_rope_settings_the_kernels_do_not_reproduce_are_refused(family, params, field):
    model = tiny_model(family)
    model.config.rope_parameters = {**model.config.rope_parameters, **params}
    assert field in _refused(model)


def test_gemma3_per_layer_type_rope_is_checked_per_type():
    model = tiny_model("gemma3")
    rope = {k: dict(v) for k, v in model.config.rope_parameters.items()}
    rope["full_attention"]["partial_rotary_factor"] = 0.5
    model.config.rope_parameters = rope
    message = _refused(model)
    assert "full_attention" in message and "partial_rotary_factor" in message


def test_a_model_built_with_partial_rotary_is_refused():
    assert "partial_rotary_factor" in _refused(tiny_model("llama", partial_rotary_factor=0.5))


@pytest.mark.parametrize("field, value", [("attention_chunk_size", 16), ("embedding_multiplier", 12.0),
                                          ("logits_scaling", 8.0)])
def test_other_unreproduced_fields_are_refused(field, value):
    model = tiny_model("llama")
    setattr(model.config, field, value)
    assert field in _refused(model)


def test_supported_rope_scalings_load():
    for params in ({"rope_type": "linear", "factor": 2.0}, {"rope_type": "dynamic", "factor": 2.0}):
        model = tiny_model("llama")
        model.config.rope_parameters = {**model.config.rope_parameters, **params}
        assert TargetRunner(model, use_kernels=False).num_layers == 4


@pytest.mark.parametrize("argv, message", [
    (["generate", ""], "prompt is empty"),
    (["generate", "hi", "--temperature", "-1"], "temperature"),
    (["generate", "hi", "--temperature", "nan"], "temperature"),
    (["generate", "hi", "--top-p", "0"], "top_p"),
    (["generate", "hi", "--top-p", "1.5"], "top_p"),
    (["generate", "hi", "--top-k", "-3"], "top_k"),
    (["generate", "hi", "--min-p", "2"], "min_p"),
    (["generate", "hi", "--max-new-tokens", "0"], "max-new-tokens"),
    (["generate", "hi", "--method", "nope"], "unknown method"),
    (["generate", "hi", "--stop", ""], "--stop"),
])
def test_cli_refuses_bad_arguments_before_loading_a_model(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(casspec, "load", lambda *a, **k: pytest.fail("loaded a model"))
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["generate", "hi", "--drafts", "a8v,nope"], ["generate", "hi", "--drafts", ","],
                                  ["serve", "--drafts", "warp"]])
def test_cli_refuses_unknown_draft_levels_before_loading(argv, monkeypatch, capsys):
    monkeypatch.setattr(casspec, "load", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2 and "unknown draft levels" in capsys.readouterr().err


def test_cli_hands_the_draft_hierarchy_to_load(monkeypatch, capsys):
    seen = {}

    def fake_load(model=None, **kw):  # noqa: ANN001, ANN003
        seen.update(kw)
        raise casspec.errors.ModelNotFoundError("stop here")
    monkeypatch.setattr(casspec, "load", fake_load)
    assert cli.main(["generate", "hi", "--drafts", "lowbitv, pld"]) != 0
    assert seen["hierarchy"] == ("lowbitv", "pld")
