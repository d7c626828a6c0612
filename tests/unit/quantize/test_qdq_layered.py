"""Static QDQ's MinMax calibration layer by layer (qdq_layered.py) against ORT's calibrator.

ORT's calibrator runs the whole graph augmented with a ReduceMin / ReduceMax per tensor; the
layered pass runs one decoder layer's segment at a time. Both compute the float graph's
activations, so the ranges must be the same numbers and the QDQ graph the same file.
"""

import numpy as np
import onnx
import pytest

from slmedge.exporter.quantize import qdq
from slmedge.exporter.quantize.calibration import KVCacheCalibrationReader, ListCalibrationReader
from slmedge.exporter.quantize.core import quantize_model
from slmedge.exporter.quantize.qdq import OP_POLICY, calibrate_layered, calibrate_ranges
from slmedge.exporter.quantize.qdq_layered import calibration_segments
from slmedge.exporter.quantize.recipe import CalibrationConfig, QuantRecipe

CALIB = CalibrationConfig(prefill_samples=2, decode_samples=6, prefill_tokens=32, max_past=64)
IDS = [int(x) for x in np.random.default_rng(0).integers(6, 128, 400)]
#: op types ORT calibrates for int8-static (weight MatMuls) and a16w8 (every policy op)
INT8_OPS = ["MatMul"]
A16_OPS = sorted(op for op, (_, a16, _) in OP_POLICY.items() if a16 != "float")


def _recipe(scheme="int8-static", **calibration):
    return QuantRecipe(scheme=scheme, calibration={**CALIB.model_dump(), **calibration})


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma3_text"])
def test_segments_cover_every_node_once_in_graph_order(tiny_artifact, model_type):
    model = onnx.load(str(tiny_artifact(model_type, fuse=False) / "model.onnx"))
    segments = calibration_segments(model)
    seen = [i for seg in segments for i in seg.nodes]
    assert sorted(seen) == list(range(len(model.graph.node)))
    layers = [seg.layer for seg in segments if seg.layer is not None]
    assert layers == sorted(set(layers)) and len(layers) >= 2  # one segment per decoder layer
    # each segment's outside reads are graph inputs, initializers or an earlier frontier
    inputs = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer}
    handed = set()
    for seg in segments:
        assert set(seg.reads) <= inputs | handed
        handed |= set(seg.frontier)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma3_text"])
@pytest.mark.parametrize("op_types", [INT8_OPS, A16_OPS], ids=["int8", "a16w8"])
def test_ranges_equal_ort_calibrator(tiny_artifact, tmp_path, model_type, op_types):
    path = tiny_artifact(model_type, fuse=False) / "model.onnx"
    reader = KVCacheCalibrationReader(path, IDS, CALIB)
    samples = list(reader.samples())
    assert any(s["past_key_values.0.key"].shape[2] > 0 for s in samples)  # decode samples too
    want = calibrate_ranges(path, ListCalibrationReader(samples), _recipe(), op_types, tmp_path)
    got = calibrate_layered(path, reader, _recipe(), op_types)
    assert reader.session is None  # the whole graph's session was freed before the segments
    assert len(want.data) > 10
    missing = sorted(set(want.data) - set(got.data))
    assert not missing, missing[:5]
    for name, td in want.data.items():
        lo, hi = got.data[name].range_value
        assert lo.dtype == td.range_value[0].dtype and lo.shape == td.range_value[0].shape
        np.testing.assert_array_equal(lo, td.range_value[0], err_msg=name)
        np.testing.assert_array_equal(hi, td.range_value[1], err_msg=name)
    # the extra ranges are tensors ORT left out (not float in the inferred value_info): the
    # quantizer never reads them
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    typed = {v.name: v.type.tensor_type.elem_type for v in
             [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    for name in set(got.data) - set(want.data):
        assert typed.get(name) not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16), name


def test_external_weights_are_read_one_segment_at_a_time(tiny_artifact, tmp_path):
    """A graph whose weights live in a .data file (every graph above 2 GB): the layered pass
    loads the graph without them and reads each segment's own; the ranges are ORT's."""
    path = tiny_artifact("llama", fuse=False) / "model.onnx"
    external = tmp_path / "ext" / "model.onnx"
    external.parent.mkdir()
    onnx.save_model(onnx.load(str(path)), str(external), save_as_external_data=True,
                    location="model.onnx.data", size_threshold=0)
    samples = list(KVCacheCalibrationReader(path, IDS, CALIB).samples())
    want = calibrate_ranges(path, ListCalibrationReader(samples), _recipe(), A16_OPS, tmp_path)
    got = calibrate_layered(external, ListCalibrationReader(samples), _recipe(), A16_OPS)
    for name, td in want.data.items():
        np.testing.assert_array_equal(got.data[name].range_value, td.range_value, err_msg=name)


def _quantized_bytes(path):
    model = onnx.load(str(path))
    return ([n.SerializeToString() for n in model.graph.node],
            {t.name: t.SerializeToString() for t in model.graph.initializer})


@pytest.mark.parametrize("scheme", ["int8-static", "a16w8"])
def test_quantized_graph_is_the_same_file(tiny_artifact, tmp_path, monkeypatch, scheme):
    art = tiny_artifact("llama", fuse=False)
    recipe = _recipe(scheme, writer="whole")  # ORT's writer both ways: test_qdq_writer's
    outs = {}
    for layered in (False, True):
        monkeypatch.setattr(qdq, "QDQ_LAYERED", layered)
        outs[layered] = tmp_path / f"{layered}.onnx"
        quantize_model(art / "model.onnx", outs[layered], recipe, calibration_ids=IDS)
    whole, layered = _quantized_bytes(outs[False]), _quantized_bytes(outs[True])
    assert whole[0] == layered[0]  # the same nodes, in order
    assert whole[1].keys() == layered[1].keys()
    differ = [k for k in whole[1] if whole[1][k] != layered[1][k]]
    assert not differ, differ[:5]  # the same scales and zero points, bit for bit
    ops = [n.op_type for n in onnx.load(str(outs[True])).graph.node]
    assert ops.count("QuantizeLinear") > 0  # a QDQ graph at all


def test_entropy_keeps_ort_calibrator(tiny_artifact):
    assert qdq.layered_calibration(_recipe())
    assert not qdq.layered_calibration(_recipe(method="entropy"))


def test_static_shape_graphs_quantize_to_the_same_files(tmp_path_factory, tiny_dir, tmp_path,
                                                        monkeypatch):
    """The NPU flow (static_shapes_qdq.quantize_static_graphs: prefill and decode graphs
    sharing one external weights file, ranges merged across them): the same QDQ files."""
    import json
    import shutil

    from helpers.static_fixtures import static_artifact_path

    from slmedge.exporter.onnx.static_shapes_qdq import quantize_static_graphs

    art = static_artifact_path(tmp_path_factory, tiny_dir)
    static = json.loads((art / "manifest.json").read_text())["static"]
    files, calls = {}, []
    real = qdq.calibrate_layered
    monkeypatch.setattr(qdq, "calibrate_layered", lambda *a, **k: calls.append(1) or real(*a, **k))
    for layered in (False, True):
        monkeypatch.setattr(qdq, "QDQ_LAYERED", layered)
        work = tmp_path / str(layered)
        shutil.copytree(art, work)
        # ORT's writer both ways: test_qdq_writer's
        quantize_static_graphs(work, static, QuantRecipe(scheme="a16w8",
                                                         calibration={"writer": "whole"}), IDS,
                               float_ops=["Softmax"])
        files[layered] = {p.name: p.read_bytes() for p in sorted(work.glob("*.onnx*"))}
    assert len(calls) == 2  # the layered run calibrated both graphs layer by layer
    assert files[False].keys() == files[True].keys() and len(files[True]) >= 3
    differ = [name for name in files[True] if files[True][name] != files[False][name]]
    assert not differ, differ


def test_prefix_is_float_unless_asked():
    """Today's calibration (the float graph's activations: the files above, ORT's bytes)
    stays the default; the quantized prefix is minmax only, as the layered walk is."""
    assert _recipe().calibration.prefix.value == "float"
    assert _recipe(prefix="quantized").label() != _recipe().label()
    with pytest.raises(ValueError, match="minmax"):
        _recipe(method="entropy", prefix="quantized")


def _layer_nodes(model, segment):
    return [model.graph.node[i].name for i in segment.nodes]


@pytest.mark.parametrize("scheme", ["int8-static", "a16w8"])
def test_prefix_quantized_ranges_are_those_behind_the_qdq_prefix(tiny_artifact, tmp_path, scheme):
    """Through the quantized prefix, segment 0 (nothing quantized before it) has the float
    ranges; segment 1's are the min / max of the graph whose segment-0 nodes are QDQ'd by
    quantize_static with those ranges (an independent run of the whole graph), and differ
    from the float ones."""
    from onnxruntime.quantization import quantize_static

    from slmedge.exporter.quantize.graph import analyze
    from slmedge.exporter.quantize.qdq import _static_options, plan_static, save_ranges
    from slmedge.exporter.quantize.qdq_layered import _MinMax

    path = tiny_artifact("llama", fuse=False) / "model.onnx"
    model = onnx.load(str(path))
    recipe, through = _recipe(scheme), _recipe(scheme, prefix="quantized")
    nodes, table = plan_static(model, analyze(model), recipe)
    op_types = sorted(op for op, row in table.items() if row["quantized"])
    samples = list(KVCacheCalibrationReader(path, IDS, CALIB).samples())
    plain = calibrate_layered(path, ListCalibrationReader(samples), recipe, op_types)
    got = calibrate_layered(path, ListCalibrationReader(samples), through, op_types, nodes=nodes)
    assert got.data.keys() == plain.data.keys()
    segments = calibration_segments(model)
    made = [{o for i in seg.nodes for o in model.graph.node[i].output} for seg in segments]
    first = [t for t in got.data if t in made[0]]
    second = [t for t in got.data if t in made[1]]
    assert first and second
    for t in first + [i.name for i in model.graph.input if i.name in got.data]:
        np.testing.assert_array_equal(got.data[t].range_value, plain.data[t].range_value,
                                      err_msg=t)
    changed = [t for t in second
               if not np.array_equal(got.data[t].range_value, plain.data[t].range_value)]
    assert len(changed) > len(second) // 2, (len(changed), len(second))
    # the reference: the whole graph, segment 0's chosen nodes QDQ'd, the rest float
    ranges = save_ranges(got, tmp_path / "ranges.json")
    partial = tmp_path / "partial.onnx"
    chosen0 = [n for n in nodes if n in set(_layer_nodes(model, segments[0]))]
    quantize_static(str(path), str(partial), None, op_types_to_quantize=op_types,
                    nodes_to_quantize=chosen0, calibration_cache_path=str(ranges),
                    **_static_options(recipe))
    ref = onnx.load(str(partial))
    del ref.graph.output[:]
    ref.graph.output.extend(onnx.ValueInfoProto(name=t) for t in second)
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(ref.SerializeToString(), opts,
                                   providers=["CPUExecutionProvider"])
    feeds = {i.name for i in session.get_inputs()}
    stats = _MinMax()
    for sample in samples:
        for t, v in zip(second, session.run(second, {k: sample[k] for k in feeds}), strict=True):
            stats.add(t, v)
    want = stats.tensors_data()
    assert want.data.keys() == set(second)
    for t in second:
        np.testing.assert_allclose(got.data[t].range_value, want.data[t].range_value,
                                       rtol=1e-6, atol=1e-7, err_msg=t)


@pytest.mark.parametrize("scheme, floor", [("int8-static", 0.93), ("a16w8", 0.98)])
def test_prefix_quantized_graph_is_valid_and_close(tiny_artifact, tmp_path, scheme, floor):
    """The graph quantized with ranges through the quantized prefix: a valid QDQ file of the
    same structure as today's (only scales / zero points differ), its logits as close to the
    fp32 graph's as the static tests require (tests/parity/test_quant_structure.py)."""
    from slmedge.runtimes.sessions.onnx_decoder import OnnxDecoder

    art = tiny_artifact("llama", fuse=False)
    outs = {}
    for prefix in ("float", "quantized"):
        outs[prefix] = tmp_path / f"{prefix}.onnx"
        report = quantize_model(art / "model.onnx", outs[prefix], _recipe(scheme, prefix=prefix),
                                calibration_ids=IDS)
    assert report.recipe["calibration"]["prefix"] == "quantized"
    onnx.checker.check_model(onnx.load(str(outs["quantized"])), full_check=True)
    plain, through = _quantized_bytes(outs["float"]), _quantized_bytes(outs["quantized"])
    assert [onnx.NodeProto.FromString(n).op_type for n in plain[0]] == \
        [onnx.NodeProto.FromString(n).op_type for n in through[0]]
    assert plain[1].keys() == through[1].keys()
    assert any(plain[1][k] != through[1][k] for k in plain[1])  # other scales somewhere
    ids = IDS[:48]
    want = OnnxDecoder(art / "model.onnx").logits(ids)
    for prefix, out in outs.items():
        got = OnnxDecoder(out).logits(ids)
        cos = (got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want)
        assert cos > floor, (prefix, cos)


def test_cli_flag_sets_the_recipe_field():
    import argparse

    from slmedge.tools.cli.quantize import add_quant_flags, quant_fields

    p = argparse.ArgumentParser()
    add_quant_flags(p)
    fields = quant_fields(p.parse_args(["--quant", "a16w8", "--calib-prefix", "quantized"]))
    recipe = QuantRecipe(**fields["quant"])
    assert recipe.calibration.prefix.value == "quantized"
    assert "qprefix" in recipe.label()
    fields = quant_fields(p.parse_args(["--quant", "a16w8"]))
    assert QuantRecipe(**fields["quant"]).calibration.prefix.value == "float"



def test_a16w8_of_external_weights_converts_the_opset_without_loading_them(tiny_artifact,
                                                                          tmp_path, monkeypatch):
    """16-bit Q/DQ needs opset 21; ORT converts an older graph with its weights loaded, which
    fails above 2 GB (Qwen2.5-0.5B: EncodeError). A graph in external data is converted
    without its weights beside the original: the same QDQ graph as the inline one."""
    from slmedge.exporter.quantize.graph import analyze
    from slmedge.exporter.quantize.qdq import opset_for_16_bit, quantize_static_qdq

    path = tiny_artifact("llama", fuse=False) / "model.onnx"
    assert opset_for_16_bit(path) == path  # inline weights: ORT's own conversion, as before
    external = tmp_path / "ext" / "model.onnx"
    external.parent.mkdir()
    model = onnx.load(str(path))
    assert model.opset_import[0].version < 21
    onnx.save_model(model, str(external), save_as_external_data=True,
                    location="model.onnx.data", size_threshold=0)
    converted = opset_for_16_bit(external)
    assert converted != external and converted.parent == external.parent
    assert {o.domain: o.version for o in onnx.load(str(converted)).opset_import}[""] == 21
    converted.unlink()
    samples = list(KVCacheCalibrationReader(path, IDS, CALIB).samples())
    # ORT's whole-graph pass converts the opset
    facts, recipe, outs = analyze(model), _recipe("a16w8", writer="whole"), {}
    for name, src in (("inline", path), ("external", external)):
        outs[name] = tmp_path / f"{name}.onnx"
        quantize_static_qdq(src, outs[name], facts, recipe, ListCalibrationReader(samples))
    assert sorted(p.name for p in external.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    inline, ext = onnx.load(str(outs["inline"])), onnx.load(str(outs["external"]))
    assert [n.op_type for n in inline.graph.node] == [n.op_type for n in ext.graph.node]
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in ext.graph.initializer}
    for t in inline.graph.initializer:
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(t), weights[t.name], t.name)


def test_static_shape_graphs_calibrate_through_the_quantized_prefix(tmp_path_factory, tiny_dir,
                                                                   tmp_path):
    """The NPU flow passes each graph's chosen nodes, so the prefix option works there too:
    other scales than the float prefix's, the same QDQ structure."""
    import json
    import shutil

    from helpers.static_fixtures import static_artifact_path

    from slmedge.exporter.onnx.static_shapes_qdq import quantize_static_graphs

    art = static_artifact_path(tmp_path_factory, tiny_dir)
    static = json.loads((art / "manifest.json").read_text())["static"]
    graphs = {}
    for prefix in ("float", "quantized"):
        work = tmp_path / prefix
        shutil.copytree(art, work)
        quantize_static_graphs(work, static, _recipe("a16w8", prefix=prefix), IDS,
                               float_ops=["Softmax"])
        graphs[prefix] = {p.name: onnx.load(str(p)) for p in sorted(work.glob("*.onnx"))}
    assert graphs["float"].keys() == graphs["quantized"].keys() and graphs["float"]
    for name, model in graphs["quantized"].items():
        plain = graphs["float"][name]
        assert [n.op_type for n in model.graph.node] == [n.op_type for n in plain.graph.node]
    scales = [{t.name: t.SerializeToString() for t in g.graph.initializer if "scale" in t.name}
              for g in (graphs["float"]["decode.onnx"], graphs["quantized"]["decode.onnx"])]
    assert scales[0].keys() == scales[1].keys() and scales[0] != scales[1]
