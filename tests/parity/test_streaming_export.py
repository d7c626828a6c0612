"""Streaming export (empty model traced, weights read one tensor at a time when written) gives
the in-memory export's graph: same op counts, same initializer names and shapes, the same
bytes in every weight. The in-memory reference is the export before streaming: the model
loaded by transformers, ``export_decoder`` (traced with its weights, cleaned up, saved) and
``fuse_onnx_file`` (load, fuse, save)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers.tiny_models import TINY_MODEL_TYPES

from slmedge.exporter.pipeline import ExportConfig, run_export
from slmedge.exporter.onnx.graph_writer import save_graph
from slmedge.exporter.onnx.lazy_weights import SafetensorsWeights, empty_model
from slmedge.exporter.onnx.convert import export_decoder
from slmedge.exporter.passes import FusionOptions, fuse_onnx_file
from slmedge.exporter.sources.load import load_source, open_source
from slmedge.exporter.onnx.streaming import export_streamed
from slmedge.runtimes.errors import ModelSourceError


def graph_facts(path: Path) -> tuple[Counter, dict[str, np.ndarray]]:
    model = ir.load(str(path))
    ops = Counter(f"{n.domain}:{n.op_type}" for n in model.graph)
    return ops, {k: v.const_value.numpy() for k, v in model.graph.initializers.items()}


def assert_same_graph(a: Path, b: Path) -> None:
    ops_a, weights_a = graph_facts(a)
    ops_b, weights_b = graph_facts(b)
    assert ops_a == ops_b
    assert sorted(weights_a) == sorted(weights_b)
    for name, want in weights_a.items():
        got = weights_b[name]
        assert (got.dtype, got.shape) == (want.dtype, want.shape), name
        assert got.tobytes() == want.tobytes(), f"{name}: bytes differ"


def in_memory_export(source: str, path: Path, dtype: str) -> None:
    loaded = load_source(source, dtype=dtype)
    export_decoder(loaded.model, loaded.spec, path)
    if dtype == "fp32":  # export.py fuses fp32 graphs only
        fuse_onnx_file(path, options=FusionOptions.from_hf_config(loaded.model.config))


def streamed_export(source: str, path: Path, dtype: str, **kwargs) -> dict:
    streamed = open_source(source, dtype=dtype)
    options = FusionOptions.from_hf_config(streamed.model.config) if dtype == "fp32" else None
    messages: list[str] = []
    info, fusion = export_streamed(streamed, path, fuse_options=options, say=messages.append,
                                   **kwargs)
    return {"info": info, "fusion": fusion, "messages": messages}


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_streamed_fp32_graph_equals_in_memory(model_type, tiny_dir, tmp_path):
    source = str(tiny_dir(model_type))
    in_memory_export(source, tmp_path / "memory.onnx", "fp32")
    out = streamed_export(source, tmp_path / "streamed.onnx", "fp32")
    assert_same_graph(tmp_path / "memory.onnx", tmp_path / "streamed.onnx")
    assert out["fusion"].counts["GroupQueryAttention"] == 2
    # progress: a line per layer and a last one for all weights, each with an ETA
    writes = [m for m in out["messages"] if m.startswith("writing weights")]
    assert any("layer 2/2" in m for m in writes) and "all layers" in writes[-1]
    assert all("ETA" in m for m in writes)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_streamed_fp16_graph_equals_in_memory(model_type, tiny_dir, tmp_path):
    source = str(tiny_dir(model_type))
    in_memory_export(source, tmp_path / "memory.onnx", "fp16")
    streamed_export(source, tmp_path / "streamed.onnx", "fp16")
    assert_same_graph(tmp_path / "memory.onnx", tmp_path / "streamed.onnx")


def test_sharded_checkpoint_with_external_data(tiny_dir, tmp_path):
    """Shards through model.safetensors.index.json; weights into model.onnx.data."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_dir("qwen2")
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(str(src)).save_pretrained(sharded, max_shard_size="40KB")
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(sharded)
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    in_memory_export(str(src), tmp_path / "memory.onnx", "fp32")
    out = streamed_export(str(sharded), tmp_path / "streamed.onnx", "fp32", external_data=True)
    assert out["info"].external_data and (tmp_path / "streamed.onnx.data").exists()
    assert_same_graph(tmp_path / "memory.onnx", tmp_path / "streamed.onnx")


def test_gguf_streamed_equals_in_memory(tmp_path):
    from helpers.gguf_writer import save_tiny_gguf

    g = save_tiny_gguf("llama", tmp_path / "tiny.gguf")
    in_memory_export(str(g.path), tmp_path / "memory.onnx", "fp32")
    streamed_export(str(g.path), tmp_path / "streamed.onnx", "fp32")
    assert_same_graph(tmp_path / "memory.onnx", tmp_path / "streamed.onnx")


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_gguf_weights_read_one_at_a_time_equal_transformers_load(model_type, tmp_path):
    """Every parameter read from the GGUF alone (dequantized, un-permuted) equals what
    transformers' whole-file loader put in the model."""
    import torch
    from helpers.gguf_writer import save_tiny_gguf

    from slmedge.exporter.sources.gguf import load_gguf, open_gguf_streamed

    g = save_tiny_gguf(model_type, tmp_path / f"{model_type}.gguf")
    model, _, _ = load_gguf(g.path, torch.float32)
    empty, _, _, weights = open_gguf_streamed(g.path, torch.float32)
    state = dict(model.named_parameters())
    names = dict(empty.named_parameters())
    assert sorted(names) == sorted(state)
    for name in names:
        alias = name if name in weights.names() else "model.embed_tokens.weight"
        got = weights.read(alias).to(torch.float32)
        assert torch.equal(got, state[name].detach()), name


def test_single_file_writer_equals_onnx_ir_save(tiny_dir, tmp_path):
    """The streamed single-file protobuf is the model onnx_ir.save writes."""
    streamed = open_source(str(tiny_dir("phi3")))
    from slmedge.exporter.onnx.streaming import build_streamed_graph

    graph, *_ = build_streamed_graph(streamed)
    save_graph(graph, tmp_path / "streamed.onnx", external_data=False)
    ir.save(graph, str(tmp_path / "ir.onnx"))
    a, b = onnx.load(str(tmp_path / "ir.onnx")), onnx.load(str(tmp_path / "streamed.onnx"))
    onnx.checker.check_model(b)
    assert len(a.graph.initializer) == len(b.graph.initializer)
    for ta, tb in zip(a.graph.initializer, b.graph.initializer, strict=True):
        assert (ta.name, list(ta.dims), ta.data_type, ta.raw_data) == \
            (tb.name, list(tb.dims), tb.data_type, tb.raw_data)
    a.graph.ClearField("initializer")
    b.graph.ClearField("initializer")
    assert a == b


def test_empty_model_has_no_data_and_keeps_ties(tiny_dir):
    import torch
    from transformers import AutoConfig

    model = empty_model(AutoConfig.from_pretrained(str(tiny_dir("gemma3_text"))), torch.float32)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_missing_tensor_is_a_clear_error(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tiny_dir("llama")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    assert "model.layers.1.mlp.up_proj.weight" not in SafetensorsWeights(broken).names()
    with pytest.raises(ModelSourceError, match=r"no tensor for 1 parameter.*up_proj"):
        streamed_export(str(broken), tmp_path / "x.onnx", "fp32")


def test_parity_skipped_above_the_reference_budget_is_said(tiny_dir, tmp_path):
    """A reference model larger than the budget is not loaded: the manifest says why."""
    messages: list[str] = []
    manifest = run_export(ExportConfig(model=str(tiny_dir("llama")), output=tmp_path / "a",
                                       parity_reference_max_mb=0.01), progress=messages.append)
    parity = manifest["verification"]["parity"]
    assert parity["passed"] is None and "not compared with PyTorch" in parity["skipped"]
    assert any(m.startswith("parity gate skipped") for m in messages)


def test_parity_compared_below_the_budget_names_its_reference(tiny_artifact):
    import json

    manifest = json.loads((tiny_artifact("llama") / "manifest.json").read_text())
    parity = manifest["verification"]["parity"]
    assert parity["passed"] is True and parity["reference"].startswith("PyTorch fp32 model")


@pytest.mark.slow
def test_smollm2_gguf_streamed_equals_in_memory(smollm2_artifact, tmp_path):
    """The streamed side is the session's SmolLM2 export (conftest.py): ``run_export`` streams
    with the same fusion options as ``streamed_export``, so a second SmolLM2 export here would
    only repeat it (~1 min of the CI run)."""
    in_memory_export("embedded:smollm2-135m-instruct", tmp_path / "memory.onnx", "fp32")
    assert_same_graph(tmp_path / "memory.onnx", smollm2_artifact / "model.onnx")
