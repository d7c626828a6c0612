"""The QDQ graph written one segment at a time (qdq_writer.py) against quantize_static on the
whole graph: the same nodes (as a multiset), the same initializer values, the same logits."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from slmedge.exporter.quantize import qdq
from slmedge.exporter.quantize.calibration import KVCacheCalibrationReader
from slmedge.exporter.quantize.core import quantize_model
from slmedge.exporter.quantize.qdq_writer import neutral_form, same_graph, whole_graph_form
from slmedge.exporter.quantize.recipe import CalibrationConfig, QuantRecipe

CALIB = CalibrationConfig(prefill_samples=2, decode_samples=4, prefill_tokens=32, max_past=64)
IDS = [int(x) for x in np.random.default_rng(0).integers(6, 128, 400)]


def _both(src, tmp_path, scheme, **calibration):
    """``src`` quantized by ORT's whole-graph writer, then by the segments' (the default)."""
    outs = {}
    for writer in ("whole", "segments"):
        recipe = QuantRecipe(scheme=scheme, calibration={**CALIB.model_dump(), **calibration,
                                                         "writer": writer})
        outs[writer] = tmp_path / writer / "model.onnx"
        outs[writer].parent.mkdir()
        quantize_model(src, outs[writer], recipe, calibration_ids=IDS)
    return outs["whole"], outs["segments"]


def _logits(path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], feeds)[0]


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma3_text"])
@pytest.mark.parametrize("scheme", ["int8-static", "a16w8"])
def test_writer_equals_quantize_static(tiny_artifact, tmp_path, model_type, scheme):
    src = tiny_artifact(model_type, fuse=False) / "model.onnx"
    whole, layered = _both(src, tmp_path, scheme)
    a, b = onnx.load(str(whole)), onnx.load(str(layered))
    assert not same_graph(a, b), same_graph(a, b)
    assert sum(n.op_type == "QuantizeLinear" for n in b.graph.node) > 0  # a QDQ graph at all
    assert [i.name for i in a.graph.input] == [i.name for i in b.graph.input]
    assert [o.name for o in a.graph.output] == [o.name for o in b.graph.output]
    assert a.opset_import == b.opset_import
    onnx.checker.check_model(b)
    for feeds in list(KVCacheCalibrationReader(src, IDS, CALIB).samples())[::2]:
        np.testing.assert_array_equal(_logits(layered, feeds), _logits(whole, feeds))


def test_same_graph_sees_a_changed_scale(tiny_artifact, tmp_path):
    """The comparison itself can fail: one scale moved by one ulp is reported."""
    src = tiny_artifact("llama", fuse=False) / "model.onnx"
    whole, _ = _both(src, tmp_path, "int8-static")
    a, b = onnx.load(str(whole)), onnx.load(str(whole))
    scale = next(t for t in b.graph.initializer if t.name.endswith("_scale"))
    value = onnx.numpy_helper.to_array(scale).copy()
    value.flat[0] = np.nextafter(value.flat[0], np.float32(1))
    scale.CopyFrom(onnx.numpy_helper.from_array(value, scale.name))
    assert same_graph(a, b) == [f"initializer {scale.name} differs"]
    b.graph.node.pop()
    assert any("nodes differ" in d for d in same_graph(a, b))


def _pair(t, q_input, dq_output):
    h = onnx.helper
    return [h.make_node("QuantizeLinear", [q_input, "s", "z"], [f"{t}_QuantizeLinear_Output"],
                        f"{t}_QuantizeLinear"),
            h.make_node("DequantizeLinear", [f"{t}_QuantizeLinear_Output", "s", "z"], [dq_output],
                        f"{t}_DequantizeLinear")]


def test_border_pairs_join_to_the_whole_graph_form():
    """Segment A made x as its output (ORT's graph-output form: producer -> x_QuantizeLinear_Input,
    DQ -> x); segment B read x as an input (plain form) and a float node of B reads x too:
    joined, every reader reads x's DQ output and the producer writes x; a model output y keeps
    its name on the DQ side."""
    h = onnx.helper
    seg_a = [h.make_node("Relu", ["in"], ["x_QuantizeLinear_Input"], "producer"),
             *_pair("x", "x_QuantizeLinear_Input", "x"), h.make_node("Neg", ["x"], ["a1"], "inner")]
    seg_b = [*_pair("x", "x", "x_DequantizeLinear_Output"),
             h.make_node("Abs", ["x_DequantizeLinear_Output"], ["y"], "quantized_reader"),
             h.make_node("Sqrt", ["x"], ["b1"], "float_reader"), *_pair("y", "y", "y_DequantizeLinear_Output")]
    pairs = neutral_form(seg_a) | neutral_form(seg_b)
    assert pairs == {"x", "y"}
    assert [list(n.input) for n in seg_a[1:2]] == [["x", "s", "z"]]
    nodes = seg_a + seg_b[2:]  # B's pair for x is A's, dropped by the join
    whole_graph_form(nodes, pairs, {"y"})
    by = {n.name: n for n in nodes}
    assert list(by["producer"].output) == ["x"]
    assert by["inner"].input[0] == by["float_reader"].input[0] == "x_DequantizeLinear_Output"
    assert list(by["quantized_reader"].output) == ["y_QuantizeLinear_Input"]
    assert by["y_QuantizeLinear"].input[0] == "y_QuantizeLinear_Input"
    assert list(by["y_DequantizeLinear"].output) == ["y"]


def test_static_shape_graphs_written_by_segment(tmp_path_factory, tiny_dir, tmp_path):
    """The NPU flow (prefill and decode graphs on one external weights file, ranges merged
    across them, handed as a cache file): the writer gives each the same graph (with the
    norms fused, QNN HTP's profiles: tests/cli/test_qnn_export.py)."""
    import json
    import shutil

    from helpers.static_fixtures import static_artifact_path

    from slmedge.exporter.onnx.static_shapes_qdq import quantize_static_graphs

    art = static_artifact_path(tmp_path_factory, tiny_dir)
    static = json.loads((art / "manifest.json").read_text())["static"]
    graphs = {}
    for writer in ("whole", "segments"):
        work = tmp_path / writer
        shutil.copytree(art, work)
        quantize_static_graphs(work, static, QuantRecipe(scheme="a16w8",
                                                         calibration={"writer": writer}), IDS,
                               float_ops=["Softmax"])
        graphs[writer] = {p.name: onnx.load(str(p)) for p in sorted(work.glob("*.onnx"))}
    assert graphs["whole"].keys() == graphs["segments"].keys() and len(graphs["segments"]) >= 2
    for name, model in graphs["segments"].items():
        assert not same_graph(graphs["whole"][name], model), (name, same_graph(graphs["whole"][name], model))


def test_entropy_keeps_the_whole_graph_writer():
    """Entropy / percentile ranges come from ORT's histogram calibrators inside
    quantize_static: their recipes write the whole graph, and say so (also when a dumped
    config with the default segments is read back with another method)."""
    from slmedge.exporter.quantize.recipe import QdqWriter

    for method in ("entropy", "percentile"):
        recipe = QuantRecipe(scheme="int8-static", calibration={"method": method})
        assert recipe.calibration.writer is QdqWriter.whole
        assert qdq.static_writer(recipe) is QdqWriter.whole
        dumped = {**QuantRecipe(scheme="int8-static").calibration.model_dump(), "method": method}
        recipe = QuantRecipe(scheme="int8-static", calibration=dumped)
        assert recipe.model_dump(mode="json")["calibration"]["writer"] == "whole"


def test_writer_is_a_recipe_field_and_a_flag():
    import argparse

    from slmedge.exporter.quantize.recipe import QdqWriter
    from slmedge.tools.cli.quantize import add_quant_flags, quant_fields

    p = argparse.ArgumentParser()
    add_quant_flags(p)
    fields = quant_fields(p.parse_args(["--quant", "int8-static"]))
    recipe = QuantRecipe(**fields["quant"])
    assert recipe.calibration.writer is QdqWriter.segments  # the default
    assert qdq.static_writer(recipe) is QdqWriter.segments
    fields = quant_fields(p.parse_args(["--quant", "a16w8", "--calib-writer", "whole"]))
    recipe = QuantRecipe(**fields["quant"])
    assert recipe.calibration.writer is QdqWriter.whole
    assert recipe.model_dump(mode="json")["calibration"]["writer"] == "whole"  # the manifest's
    with pytest.raises(ValueError, match="segments.*whole|whole.*segments"):
        QuantRecipe(scheme="a16w8", calibration={"writer": "layers"})


def test_streamed_inline_save_loads_as_save_model(tmp_path):
    """Initializers from the external-data file written inline one at a time: the file loads
    to the same model as onnx.save_model's, and ONNX Runtime runs it."""
    from onnx import helper, numpy_helper

    from slmedge.exporter.quantize.qdq_writer import _Initializers, save_inline_streamed

    rng = np.random.default_rng(1)
    weights = {"w": rng.standard_normal((64, 300)).astype(np.float32),
               "small": np.arange(8, dtype=np.float32),
               "q": rng.integers(-128, 127, (300, 8), dtype=np.int8)}
    store = _Initializers(tmp_path / "m.onnx.data")
    for name, value in weights.items():
        store.add(numpy_helper.from_array(value, name))
    store.close()
    assert (tmp_path / "m.onnx.data").stat().st_size > 0  # the large ones went out
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Cast", ["q"], ["qf"], to=onnx.TensorProto.FLOAT),
             helper.make_node("MatMul", ["h", "qf"], ["y0"]), helper.make_node("Add", ["y0", "small"], ["y1"]),
             helper.make_node("ReduceSum", ["y1"], ["y"], keepdims=0)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [2, 64])],
                              [helper.make_tensor_value_info("y", 1, [])], initializer=store.tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.metadata_props.add(key="k", value="v")
    save_inline_streamed(model, tmp_path / "m.onnx", tmp_path / "m.onnx.data")
    (tmp_path / "m.onnx.data").unlink()  # nothing may still point at it
    got = onnx.load(str(tmp_path / "m.onnx"))
    assert {t.name: numpy_helper.to_array(t).tobytes() for t in got.graph.initializer} == \
        {k: v.tobytes() for k, v in weights.items()}
    assert got.metadata_props[0].value == "v" and len(got.graph.node) == 5
    x = rng.standard_normal((2, 64)).astype(np.float32)
    y = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    want = ((x @ weights["w"]) @ weights["q"].astype(np.float32) + weights["small"]).sum()
    np.testing.assert_allclose(y, want, rtol=1e-4)
