"""The streaming quantizer (quantize_file_streaming) against today's in-memory one
(quantize_model): the same fp32 graph through both must give the same nodes (order, names,
inputs, attributes), byte-identical initializers and equal logits through onnxruntime.

The fp32 source is given to the streaming path with its weights in an external-data file
(how a large export arrives), so the offset/length reads are what is compared.
"""

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from helpers.tiny_models import TINY_MODEL_TYPES

from slmedge.exporter.quantize.core import quantize_model
from slmedge.exporter.quantize.recipe import QuantRecipe
from slmedge.exporter.quantize.streaming import quantize_file_streaming
from slmedge.runtimes.errors import UnsupportedOp
from slmedge.runtimes.sessions.onnx_decoder import OnnxDecoder

IDS = list(range(6, 40))
#: the recipes the brief names, on every architecture
CORE_RECIPES = {
    "int4-rtn-asym": dict(scheme="int4", algorithm="rtn"),
    "int4-rtn-sym": dict(scheme="int4", symmetric=True),
    "int8-nbits": dict(scheme="int8"),
    "int4-head8-emb8": dict(scheme="int4", algorithm="rtn", lm_head="int8", embedding="int8"),
}
#: the other settings the streaming path takes, on a tied (gemma3) and an untied (llama) model
MORE_RECIPES = {
    "int4-hqq-folded": dict(scheme="int4"),  # the default int4: HQQ + fold_float_zero_points
    "int4-hqq-u12": dict(scheme="int4", zero_point_storage="uint12"),  # M as 12-bit codes
    "int4-sym-mlp64-head4-emb4": dict(scheme="int4", symmetric=True, mlp_block_size=64,
                                      lm_head="int4", embedding="int4"),  # tied: one shared table
    "int4-keep1-headf-emb8": dict(scheme="int4", algorithm="rtn", keep_layers=[1], lm_head="float",
                                  embedding="int8", block_size=16, accuracy_level=0),
    "int8-keep0-head-float": dict(scheme="int8", keep_layers=[0], lm_head="float"),
}


def external_copy(model_path: Path, out_dir: Path) -> Path:
    """``model_path`` re-saved with every initializer of 1 KB or more in ``model.onnx.data``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(model_path))
    dst = out_dir / "model.onnx"
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    return dst


def _node_key(node):
    attrs = sorted((a.name, repr(helper.get_attribute_value(a))) for a in node.attribute)
    return node.op_type, node.domain, node.name, list(node.input), list(node.output), attrs


def assert_same_quantized_graph(mem_path: Path, stream_path: Path) -> None:
    mem, streamed = onnx.load(str(mem_path)), onnx.load(str(stream_path))
    assert Counter(n.op_type for n in streamed.graph.node) == Counter(n.op_type for n in mem.graph.node)
    assert [_node_key(n) for n in streamed.graph.node] == [_node_key(n) for n in mem.graph.node]
    assert {(o.domain, o.version) for o in streamed.opset_import} == {
        (o.domain, o.version) for o in mem.opset_import}
    assert streamed.ir_version == mem.ir_version
    a = {t.name: t for t in mem.graph.initializer}
    b = {t.name: t for t in streamed.graph.initializer}
    assert sorted(b) == sorted(a)
    for name, t in a.items():
        x, y = numpy_helper.to_array(t), numpy_helper.to_array(b[name])
        assert (t.data_type, list(t.dims)) == (b[name].data_type, list(b[name].dims)), name
        assert x.tobytes() == y.tobytes(), f"{name}: bytes differ"
    got, want = OnnxDecoder(stream_path).logits(IDS), OnnxDecoder(mem_path).logits(IDS)
    np.testing.assert_array_equal(got, want)


def _both(source: Path, tmp_path: Path, recipe: QuantRecipe, external: bool = True):
    mem = tmp_path / "mem" / "model.onnx"
    mem.parent.mkdir()
    mem_report = quantize_model(source, mem, recipe)
    src = external_copy(source, tmp_path / "src") if external else source
    streamed = tmp_path / "streamed" / "model.onnx"
    streamed.parent.mkdir()
    report = quantize_file_streaming(src, streamed, recipe)
    return mem, mem_report, streamed, report


@pytest.mark.parametrize("name", sorted(CORE_RECIPES))
@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_streamed_equals_in_memory(model_type, name, tiny_artifact, tmp_path):
    recipe = QuantRecipe(**CORE_RECIPES[name])
    mem, mem_report, streamed, report = _both(tiny_artifact(model_type) / "model.onnx", tmp_path,
                                              recipe)
    assert_same_quantized_graph(mem, streamed)
    for field in ("label", "weight_precision", "embedding", "lm_head", "op_decisions",
                  "contrib_ops", "zero_points"):
        assert getattr(report, field) == getattr(mem_report, field), field
    # the weights are outside the graph, in the data file named after it
    model = onnx.load(str(streamed), load_external_data=False)
    locations = {e.value for t in model.graph.initializer for e in t.external_data
                 if e.key == "location"}
    assert locations == {"model.onnx.data"}
    # and quantization did change the model
    fp32 = OnnxDecoder(tiny_artifact(model_type) / "model.onnx").logits(IDS)
    assert np.abs(OnnxDecoder(streamed).logits(IDS) - fp32).max() > 1e-4


@pytest.mark.parametrize("name", sorted(MORE_RECIPES))
@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_streamed_equals_in_memory_other_settings(model_type, name, tiny_artifact, tmp_path):
    recipe = QuantRecipe(**MORE_RECIPES[name])
    mem, mem_report, streamed, report = _both(tiny_artifact(model_type) / "model.onnx", tmp_path,
                                              recipe)
    assert_same_quantized_graph(mem, streamed)
    assert report.weight_precision == mem_report.weight_precision
    assert report.zero_points == mem_report.zero_points
    if name == "int4-hqq-folded":
        # QuantRecipe.zero_point_storage float16: M's fp16 rounding moves a zero point by
        # at most |8 - zp| * 2**-11 step (HQQ's zero points: ~0.004)
        assert report.zero_points == "folded-f16" and 0 < report.zero_point_error < 1 / 128
    if name == "int4-hqq-u12":
        assert report.zero_points == "folded-u12" and 0 < report.zero_point_error < 1 / 256
    if name.startswith("int4-sym-mlp64") and model_type == "gemma3_text":
        ops = [n.op_type for n in onnx.load(str(streamed), load_external_data=False).graph.node]
        assert "GatherBlockQuantized" in ops and ops.count("Reshape") >= 1
        names = [n.name for n in onnx.load(str(streamed), load_external_data=False).graph.node]
        assert any(n.endswith("/tied_reshape") for n in names)  # one table for both


@pytest.mark.parametrize("recipe", [dict(scheme="int4", algorithm="rtn"),
                                    dict(scheme="int8", lm_head="int8")])
def test_weights_quantized_a_column_slice_at_a_time_give_the_same_bytes(recipe, tiny_artifact,
                                                                         tmp_path, monkeypatch):
    """Large weights are quantized in slices of columns (CHUNK_VALUES; SmolLM2's lm_head and
    tied table are); slices of 24 columns here, which do not divide N: same bytes."""
    from slmedge.exporter.quantize import streaming

    monkeypatch.setattr(streaming, "CHUNK_VALUES", 64 * 24)
    mem, _, streamed, _ = _both(tiny_artifact("gemma3_text") / "model.onnx", tmp_path,
                                QuantRecipe(**recipe))
    assert_same_quantized_graph(mem, streamed)


def test_inline_source_streams_too(tiny_artifact, tmp_path):
    """A small graph whose weights are inside model.onnx: the same result."""
    recipe = QuantRecipe(scheme="int4", algorithm="rtn", embedding="int8")
    mem, _, streamed, _ = _both(tiny_artifact("qwen2") / "model.onnx", tmp_path, recipe,
                                external=False)
    assert_same_quantized_graph(mem, streamed)


def test_fp16_source_streams(tiny_artifact, tmp_path):
    source = tiny_artifact("llama", "fp16") / "model.onnx"
    mem, _, streamed, _ = _both(source, tmp_path, QuantRecipe(scheme="int4", algorithm="rtn"))
    assert_same_quantized_graph(mem, streamed)
    scales = [t for t in onnx.load(str(streamed), load_external_data=False).graph.initializer
              if t.name.endswith("_scales")]
    assert scales and all(t.data_type == onnx.TensorProto.FLOAT16 for t in scales)


@pytest.mark.parametrize("recipe, what", [
    (dict(scheme="int4", algorithm="gptq-act"), "gptq-act"),
    (dict(scheme="int4", algorithm="k_quant"), "k_quant"),
    (dict(scheme="int8", int8_format="qoperator"), "quantize_dynamic"),
    (dict(scheme="int8-static"), "static QDQ"),
    (dict(scheme="int4", lm_head="int4", lm_head_int8_tokens=512), "split lm_head"),
])
def test_recipes_that_need_the_whole_model_are_refused_by_name(recipe, what, tiny_artifact,
                                                                tmp_path):
    with pytest.raises(UnsupportedOp, match=what) as err:
        quantize_file_streaming(tiny_artifact("llama") / "model.onnx", tmp_path / "q.onnx",
                                QuantRecipe(**recipe))
    assert "int4 (rtn symmetric or asymmetric, hqq" in str(err.value)
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["int4-head8-emb8", "int8-nbits"])
def test_smollm2_streamed_equals_in_memory(name, smollm2_artifact, tmp_path):
    recipe = QuantRecipe(**CORE_RECIPES[name])
    mem, mem_report, streamed, report = _both(smollm2_artifact / "model.onnx", tmp_path, recipe)
    assert_same_quantized_graph(mem, streamed)
    assert report.weight_precision == mem_report.weight_precision


def _fp32_artifact_with_external_data(art: Path, root: Path) -> Path:
    """A copy of the fp32 artifact ``art`` whose weights sit in model.onnx.data."""
    import json
    import shutil

    from slmedge.exporter.manifest import file_table

    out = root / "fp32-external"
    shutil.copytree(art, out)
    external_copy(art / "model.onnx", out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"] = file_table(out, {"model.onnx", "model.onnx.data"})
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_slmedge_quantize_keeps_large_weights_in_model_onnx_data(tiny_artifact, tmp_path,
                                                                  monkeypatch):
    """quantize_artifact streams the weight-only recipe; a graph above the one-file limit
    (lowered here) keeps model.onnx.data, listed in the manifest as a model file."""
    from slmedge.exporter.quantize import pipeline
    from slmedge.runtimes.artifact import open_artifact

    art = _fp32_artifact_with_external_data(tiny_artifact("llama"), tmp_path)
    recipe = QuantRecipe(scheme="int4", algorithm="rtn", embedding="int8")
    quality = pipeline.QualityConfig(eval_tokens=128, new_tokens=4, max_ppl_increase=1000)
    monkeypatch.setattr(pipeline, "ONE_FILE_BELOW", 0)
    manifest = pipeline.quantize_artifact(art, tmp_path / "q", recipe, quality)
    out = tmp_path / "q"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("model")) == [
        "model.onnx", "model.onnx.data"]
    assert not any(p.name.startswith(".candidate") for p in out.iterdir())
    assert manifest["files"]["model.onnx.data"]["role"] == "model"
    assert manifest["quantization"]["external_data"] is True
    assert open_artifact(out).verify_hashes() == []
    # the same graph quantize_model writes, through the artifact's own files
    mem = tmp_path / "mem" / "model.onnx"
    mem.parent.mkdir()
    quantize_model(tiny_artifact("llama") / "model.onnx", mem, recipe)
    assert_same_quantized_graph(mem, out / "model.onnx")


def test_slmedge_quantize_of_a_small_model_is_one_file_as_before(tiny_artifact, tmp_path):
    from slmedge.exporter.quantize import pipeline

    art = _fp32_artifact_with_external_data(tiny_artifact("gpt2"), tmp_path)
    recipe = QuantRecipe(scheme="int8")
    quality = pipeline.QualityConfig(eval_tokens=128, new_tokens=4, max_ppl_increase=1000)
    manifest = pipeline.quantize_artifact(art, tmp_path / "q", recipe, quality)
    out = tmp_path / "q"
    assert not (out / "model.onnx.data").exists()
    assert manifest["quantization"]["external_data"] is False
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert not any(t.external_data for t in model.graph.initializer)
    mem = tmp_path / "mem" / "model.onnx"
    mem.parent.mkdir()
    quantize_model(tiny_artifact("gpt2") / "model.onnx", mem, recipe)
    assert_same_quantized_graph(mem, out / "model.onnx")


@pytest.mark.parametrize("recipe", [dict(scheme="int4"), dict(scheme="int8")])
def test_a_large_tied_table_is_looked_up_in_the_lm_heads_int8_table(recipe, tiny_artifact,
                                                                     tmp_path, monkeypatch):
    """Above TIED_TABLE_MIN_VALUES (lowered here to the tiny tied model's table) the default
    recipe's embedding reads the 8-bit lm_head's bytes: no float table in the file, the
    lookup returns exactly the rows the lm_head dequantizes, and nothing else changes
    (every other initializer and node as with large_table off)."""
    import onnxruntime as ort

    from slmedge.exporter.quantize import tied_table

    monkeypatch.setattr(tied_table, "TIED_TABLE_MIN_VALUES", 1)
    source = external_copy(tiny_artifact("gemma3_text") / "model.onnx", tmp_path / "src")
    shared, separate = tmp_path / "shared" / "model.onnx", tmp_path / "separate" / "model.onnx"
    shared.parent.mkdir()
    separate.parent.mkdir()
    report = quantize_file_streaming(source, shared, QuantRecipe(**recipe))
    old = quantize_file_streaming(source, separate, QuantRecipe(**recipe, large_table=False))
    assert report.embedding == "int8-tied" and old.embedding == "float"
    assert report.lm_head == "int8"
    a, b = onnx.load(str(shared)), onnx.load(str(separate))
    inits_a = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    inits_b = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    gather = next(n for n in b.graph.node if n.op_type == "Gather" and n.input[0] in inits_b
                  and inits_b[n.input[0]].ndim == 2)  # the float table's lookup
    head = next(n for n in a.graph.node if n.op_type == "MatMulNBits" and n.output[0] == "logits"
                or n.op_type == "MatMulNBits" and n.name.startswith("/lm_head"))
    lookup = [n for n in a.graph.node if n.name.startswith(f"{gather.name}/tied")]
    assert "GatherBlockQuantized" not in {n.op_type for n in a.graph.node}
    # the head's [N, K / bs, bs] bytes, scales and zero points read as they are stored by
    # Gathers of the ids: no node computes from initializers alone (ORT would fold it into
    # a private copy at load: a Reshape of the scales did)
    read = {n.input[0] for n in lookup if n.op_type == "Gather"}
    assert read == {i for i in head.input[1:4] if i} and all(
        n.input[1] == gather.input[1] for n in lookup if n.op_type == "Gather")
    assert not [n.name for n in lookup if all(i in inits_a for i in n.input if i)]
    rows_node = next(n for n in lookup if n.output[0] == gather.output[0])
    table = inits_b[gather.input[0]]
    assert table.dtype == np.float32 and gather.input[0] not in inits_a  # the float table: gone
    for name, value in inits_b.items():
        if name != gather.input[0]:
            assert inits_a[name].tobytes() == value.tobytes(), name
    assert (shared.stat().st_size + (shared.parent / "model.onnx.data").stat().st_size
            < separate.stat().st_size + (separate.parent / "model.onnx.data").stat().st_size
            - table.nbytes * 0.7)
    # the lookup's rows == the lm_head's dequantized weight rows, exactly (ORT's kernels)
    vocab, k = table.shape
    sub = onnx.helper.make_graph(
        lookup
        + [onnx.helper.make_node("MatMulNBits", ["eye", *head.input[1:]], ["w"], domain="com.microsoft",
                                 **{x.name: onnx.helper.get_attribute_value(x) for x in head.attribute
                                    if x.name != "accuracy_level"})],
        "g", [onnx.helper.make_tensor_value_info(gather.input[1], onnx.TensorProto.INT64, [1, None])],
        [onnx.helper.make_tensor_value_info(rows_node.output[0], onnx.TensorProto.FLOAT, None),
         onnx.helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, None)],
        [*a.graph.initializer, numpy_helper.from_array(np.eye(k, dtype=np.float32), "eye")])
    model = onnx.helper.make_model(sub, opset_imports=list(a.opset_import), ir_version=a.ir_version)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([[0, 1, vocab // 2, vocab - 1]], np.int64)
    rows, w = session.run(None, {gather.input[1]: ids})
    np.testing.assert_array_equal(rows[0], w.T[ids[0]])
    assert 0 < np.abs(rows[0] - table[ids[0]]).max() < np.abs(table).max() / 100
    # and the model still runs, close to the float-embedding one
    got, want = OnnxDecoder(shared).logits(IDS), OnnxDecoder(separate).logits(IDS)
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


def test_the_tied_table_stays_float_below_the_size(tiny_artifact, tmp_path):
    """The tiny tied model's table is far below TIED_TABLE_MIN_VALUES: the default recipe
    keeps it float (SmolLM2's 28M-value table too; its cards are unchanged)."""
    source = tiny_artifact("gemma3_text") / "model.onnx"
    out = tmp_path / "q" / "model.onnx"
    out.parent.mkdir()
    report = quantize_file_streaming(source, out, QuantRecipe(scheme="int4"))
    assert report.embedding == "float"
    assert not any(n.op_type == "GatherBlockQuantized"
                   for n in onnx.load(str(out), load_external_data=False).graph.node)


def test_a_large_untied_table_is_int8_by_default(tiny_artifact, tmp_path, monkeypatch):
    """Above TIED_TABLE_MIN_VALUES an untied table (llama: its own lm_head) is int8 as with
    --embedding int8: the same graph and bytes as that recipe, and the report says int8."""
    from slmedge.exporter.quantize import tied_table

    monkeypatch.setattr(tied_table, "TIED_TABLE_MIN_VALUES", 1)
    source = external_copy(tiny_artifact("llama") / "model.onnx", tmp_path / "src")
    default, explicit = tmp_path / "default" / "model.onnx", tmp_path / "explicit" / "model.onnx"
    default.parent.mkdir()
    explicit.parent.mkdir()
    report = quantize_file_streaming(source, default, QuantRecipe(scheme="int4"))
    want = quantize_file_streaming(source, explicit, QuantRecipe(scheme="int4", embedding="int8"))
    assert report.embedding == want.embedding == "int8"
    assert_same_quantized_graph(explicit, default)
    off = tmp_path / "off" / "model.onnx"
    off.parent.mkdir()
    assert quantize_file_streaming(source, off, QuantRecipe(scheme="int4", large_table=False)
                                   ).embedding == "float"
