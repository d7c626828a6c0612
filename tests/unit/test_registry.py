"""The architecture registry: declarative specs, clear errors, and a tiny fixture for each."""

import pytest
from helpers.tiny_models import TINY_MODEL_TYPES, tiny_config

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
    assert not missing, f"registered without a tiny fixture in tests/helpers/tiny_models.py: {missing}"
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


def test_specs_carry_their_tflite_support_and_genai_type():
    """The former side tables (tflite_graph.TFLITE_FAMILIES, bundle.GENAI_MODEL_TYPES) are spec
    attributes: an unsupported family says why; GenAI's type is the one GenAI 0.18 loaded."""
    from slmedge.exporter.architectures import tflite_model_types

    assert tflite_model_types() == ["gemma3_text", "llama", "phi3", "qwen2", "qwen3"]
    for model_type in supported_model_types():
        why = get_spec(model_type).tflite_unsupported
        assert why is None or len(why) > 20, model_type  # a reason, not a flag
    assert "Conv1D" in get_spec("gpt2").tflite_unsupported
    assert get_spec("gemma3_text").tflite_layer_types_attr == "layer_types"
    genai = {mt: get_spec(mt).genai_model_type for mt in supported_model_types()}
    assert genai == {"gemma3_text": None, "gpt2": None, "llama": "llama", "phi3": "phi3",
                     "qwen2": "qwen2", "qwen3": "qwen3"}  # not inherited: qwen3 is no qwen2


def test_a_new_family_is_refused_by_tflite_until_it_says_otherwise():
    from slmedge.exporter.architectures.registry import ArchitectureSpec

    assert ArchitectureSpec.tflite_unsupported and ArchitectureSpec.genai_model_type is None


@pytest.mark.parametrize("model_type, reason", [("gpt2", "Conv1D"), ("mamba", "no architecture")])
def test_tflite_refuses_a_family_with_its_reason_and_the_supported_list(model_type, reason):
    tflite_graph = pytest.importorskip("slmedge.exporter.tflite.convert")  # needs torch
    with pytest.raises(UnsupportedArchitecture) as err:
        tflite_graph.check_family(model_type)
    message = str(err.value)
    assert f"model_type '{model_type}' is not supported" in message and reason in message
    assert "TFLite supports gemma3_text, llama, phi3, qwen2, qwen3" in message
    assert tflite_graph.check_family("qwen3").family == "Qwen3"
