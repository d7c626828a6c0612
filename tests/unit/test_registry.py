"""The architecture registry: declarative specs, clear errors, and a tiny fixture for each."""

import pytest
from tiny_models import TINY_MODEL_TYPES, tiny_config

from slmedge.exporter.architectures import (
    get_spec,
    model_type_for_gguf,
    supported_gguf_architectures,
    supported_model_types,
)
from slmedge.runtimes.errors import EXIT_UNSUPPORTED, UnsupportedArchitecture


def test_every_registered_architecture_has_a_tiny_fixture():
    # optimum's test_all_models_tested: registering a family without a test fixture fails here.
    missing = set(supported_model_types()) - set(TINY_MODEL_TYPES)
    assert not missing, f"registered without a tiny fixture in tests/tiny_models.py: {missing}"
    for model_type in supported_model_types():
        assert tiny_config(model_type).model_type == model_type


def test_the_six_families_are_registered():
    assert set(supported_model_types()) >= {"llama", "qwen2", "qwen3", "gemma3_text", "phi3", "gpt2"}
    assert set(supported_gguf_architectures()) >= {"llama", "qwen2", "qwen3", "gemma3", "phi3", "gpt2"}
    assert model_type_for_gguf("gemma3") == "gemma3_text"


def test_unknown_model_type_lists_the_supported_ones():
    with pytest.raises(UnsupportedArchitecture) as err:
        get_spec("mamba")
    message = str(err.value)
    assert "'mamba' is not supported" in message
    for family in ("Llama", "Qwen2", "Qwen3", "Gemma 3", "Phi-3", "GPT-2"):
        assert family in message
    assert err.value.exit_code == EXIT_UNSUPPORTED == 4


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_kv_layout_matches_the_config(model_type):
    config = tiny_config(model_type)
    layers, kv_heads, head_dim = get_spec(model_type).kv_layout(config)
    assert layers == 2
    assert head_dim == 16
    assert kv_heads in (1, 2, 4)
