"""Configs whose settings the runner's own layer loop would ignore are refused at load, naming the field."""
from __future__ import annotations

import pytest

from casspec.runtime.adapter import UnsupportedModelError
from casspec.runtime.runner import TargetRunner
from casspec.testing import tiny_model


def _refused(model) -> str:
    with pytest.raises(UnsupportedModelError) as err:
        TargetRunner(model, use_kernels=False)
    return str(err.value)


@pytest.mark.parametrize("family, field, value", [
    ("gemma3", "attn_logit_softcapping", 50.0),
    ("llama", "hidden_act", "relu2"),
    ("llama", "pretraining_tp", 2),
    ("gemma3", "use_bidirectional_attention", True),
])
def test_refused_config_field_is_named(family, field, value):
    model = tiny_model(family)
    setattr(model.config, field, value)
    assert field in _refused(model)


def test_unknown_layer_type_and_sliding_layers_without_window_are_refused():
    model = tiny_model("gemma3")
    model.config.layer_types = ["sliding_attention", "chunked_attention", "full_attention", "sliding_attention"]
    assert "layer_types" in _refused(model)
    model = tiny_model("gemma3")
    model.config.sliding_window = None
    assert "sliding_window" in _refused(model)


def test_supported_configs_load():
    for family in ("llama", "qwen2", "gemma3"):
        assert TargetRunner(tiny_model(family), use_kernels=False).num_layers == 4
