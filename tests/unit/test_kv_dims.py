"""KV-cache sizes of graphs that name them symbolically (GenAI 0.18's builder: kv_cache_dim)."""

import json

import pytest

from slmedge.runtimes.errors import ArtifactError
from slmedge.runtimes.sessions.onnx_decoder import _kv_dims


def test_concrete_dims_are_taken_from_the_graph(tmp_path):
    assert _kv_dims(["batch", 3, "past", 64], tmp_path / "model.onnx") == (3, 64)


def test_symbolic_head_dim_from_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576}))
    assert _kv_dims(["batch", 3, "past", "kv_cache_dim"], tmp_path / "model.onnx") == (3, 64)


def test_symbolic_dims_from_genai_config(tmp_path):
    (tmp_path / "genai_config.json").write_text(json.dumps(
        {"model": {"decoder": {"num_key_value_heads": 2, "head_size": 32}}}))
    assert _kv_dims(["b", "heads", "p", "kv_cache_dim"], tmp_path / "model.onnx") == (2, 32)


def test_symbolic_dims_without_a_config_name_the_files(tmp_path):
    with pytest.raises(ArtifactError, match="config.json"):
        _kv_dims(["b", 3, "p", "kv_cache_dim"], tmp_path / "model.onnx")
