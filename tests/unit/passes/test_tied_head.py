"""Tied head stored once ([1, K, V]): same logits and embedding, one table; the quantizers get
back exactly the two tables they read before (in memory and on placeholders)."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper
from pass_graphs import I64, const, model, ops, run

from slmedge.exporter.passes.tied_head import TiedHeadOnce
from slmedge.exporter.quantize.external_data import TensorSource
from slmedge.exporter.quantize.graph import find_tied_heads_once, fold_weight_transposes
from slmedge.exporter.quantize.lazy_graph import LazyWeights
from slmedge.exporter.quantize.lazy_graph import fold_weight_transposes as lazy_fold

V, K = 11, 4


def _tied(table_dtype=np.float32, extra_reader: bool = False) -> ir.Model:
    """embedding = Gather(W, ids); logits = MatMul(Relu(embedding), Transpose(W)) — the
    exporter's tied head in three nodes (+ one more reader of W when ``extra_reader``)."""
    w = np.random.default_rng(0).standard_normal((V, K)).astype(table_dtype)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(table_dtype))
    gather = helper.make_node("Gather", ["w", "ids"], ["embedding"], name="node_embedding")
    helper.set_metadata_props(gather, {"pkg.torch.onnx.name_scopes": "['', 'model.embed_tokens']"})
    nodes = [gather,
             helper.make_node("Relu", ["embedding"], ["h"]),
             helper.make_node("Transpose", ["w"], ["w_t"], perm=[1, 0]),
             helper.make_node("MatMul", ["h", "w_t"], ["logits"], name="lm_head")]
    outputs = [("logits", elem, ["batch", "seq", V]), ("embedding", elem, ["batch", "seq", K])]
    if extra_reader:
        nodes.append(helper.make_node("ReduceSum", ["w"], ["total"]))
        outputs.append(("total", elem, None))
    return model(nodes, [("ids", I64, ["batch", "seq"])], outputs, [const("w", w)])


IDS = np.array([[3, 0, 10], [7, 7, 1]], np.int64)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_table_stored_once_same_numbers(dtype):
    m = _tied(dtype)
    want = run(m, {"ids": IDS})
    fusion = TiedHeadOnce()
    fusion(m)
    assert fusion.count == 1, fusion.reasons
    assert list(m.graph.initializers) == ["w_T", "w_T.axes0"]
    assert list(m.graph.initializers["w_T"].shape) == [1, K, V]
    assert ops(m) == ["Gather", "Transpose", "Squeeze", "Relu", "MatMul"]
    lookup = next(n for n in m.graph if n.op_type == "Gather")
    assert lookup.name == "node_embedding" and "embed_tokens" in lookup.metadata_props[
        "pkg.torch.onnx.name_scopes"]
    got = run(m, {"ids": IDS})
    # a gather and a transpose move values; the MatMul sums the same products
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6 if dtype == np.float32 else 1e-3)


def _folded(offset: float = 0.0) -> ir.Model:
    """The tied graph as tables below the cleanup's folding limit arrive: ``W.T`` (+ offset)
    as a second initializer instead of the Transpose."""
    m = _tied()
    transpose = next(n for n in m.graph if n.op_type == "Transpose")
    w = m.graph.initializers["w"]
    folded = ir.Value(name="w_t_folded", shape=ir.Shape([K, V]), type=ir.TensorType(w.dtype),
                      const_value=ir.tensor(np.ascontiguousarray(w.const_value.numpy().T) + offset))
    m.graph.register_initializer(folded)
    ir.convenience.replace_all_uses_with(transpose.outputs[0], folded)
    m.graph.remove(transpose, safe=True)
    return m


def test_folded_transpose_found_by_value():
    m = _folded()
    want = run(m, {"ids": IDS})
    fusion = TiedHeadOnce()
    fusion(m)
    assert fusion.count == 1, fusion.reasons
    assert list(m.graph.initializers) == ["w_T", "w_T.axes0"]
    got = run(m, {"ids": IDS})
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)


def test_untied_head_of_the_same_shape_is_left_alone():
    m = _folded(offset=np.float32(1.0))
    fusion = TiedHeadOnce()
    fusion(m)
    assert fusion.count == 0
    assert sorted(m.graph.initializers) == ["w", "w_t_folded"]


def test_table_read_by_something_else_is_left_alone_with_a_reason():
    m = _tied(extra_reader=True)
    fusion = TiedHeadOnce()
    fusion(m)
    assert fusion.count == 0
    assert "ReduceSum" in fusion.reasons[0]
    assert "w" in m.graph.initializers and "Transpose" in ops(m)


def _protos():
    """(old, new): the exporter's form and the pass's form of the same graph, as protos."""
    old = _tied()
    new = _tied()
    TiedHeadOnce()(new)
    return ir.to_proto(old), ir.to_proto(new)


def _summary(proto: onnx.ModelProto, arrays) -> tuple:
    nodes = [(n.op_type, list(n.input), list(n.output),
              sorted((a.name, str(helper.get_attribute_value(a))) for a in n.attribute))
             for n in proto.graph.node]
    inits = {t.name: arrays(t) for t in proto.graph.initializer}
    return nodes, inits


def test_quantizer_folds_both_forms_to_the_same_graph():
    old, new = _protos()
    assert [h.table.name for h in find_tied_heads_once(new)] == ["w_T"]
    assert fold_weight_transposes(old) == 1
    assert fold_weight_transposes(new) == 1
    nodes_old, inits_old = _summary(old, numpy_helper.to_array)
    nodes_new, inits_new = _summary(new, numpy_helper.to_array)
    assert nodes_new == nodes_old
    assert list(inits_new) == list(inits_old) == ["w", "w_T"]
    for name in inits_old:
        np.testing.assert_array_equal(inits_new[name], inits_old[name])


def test_lazy_quantizer_folds_the_new_form_on_placeholders(tmp_path):
    old, new = _protos()
    fold_weight_transposes(old)
    lazy = LazyWeights(new, TensorSource(tmp_path))
    assert lazy_fold(new, lazy) == 1
    assert lazy.is_placeholder("w") and lazy.is_placeholder("w_T")
    nodes_old, inits_old = _summary(old, numpy_helper.to_array)
    nodes_new, inits_new = _summary(new, lambda t: lazy.array(t.name))
    assert nodes_new == nodes_old
    assert [t.name for t in new.graph.initializer] == [t.name for t in old.graph.initializer]
    for name in inits_old:
        np.testing.assert_array_equal(inits_new[name], inits_old[name])


@pytest.mark.parametrize("model_type", ["gemma3_text", "gpt2"])
def test_tied_tiny_export_stores_its_table_once(tiny_artifact, model_type):
    """The exporter's fusion pipeline runs the pass on tied fp32 tables (numbers vs PyTorch:
    the parity tests of these same artifacts). fp16 exports are not fused today."""
    import json

    root = tiny_artifact(model_type)
    proto = onnx.load(str(root / "model.onnx"))
    heads = find_tied_heads_once(proto)
    assert len(heads) == 1
    table = numpy_helper.to_array(heads[0].table)[0]  # [K, V]
    copies = [t.name for t in proto.graph.initializer
              if sorted(t.dims) in (sorted(table.shape), [1, *sorted(table.shape)])
              and any(np.array_equal(numpy_helper.to_array(t).reshape(s), table.reshape(s).T
                                     if s != table.shape else table)
                      for s in {table.shape, table.shape[::-1]} if np.prod(t.dims) == table.size)]
    assert copies == [heads[0].table.name]
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["fusion"]["counts"][TiedHeadOnce.name] == 1


def test_quantizers_put_the_chunked_fp16_head_back(tmp_path, monkeypatch):
    """An fp16 head computed in vocabulary chunks reaches the quantizers as the one-MatMul
    form: the same nodes and tables after folding, in memory and on placeholders."""
    from slmedge.exporter.passes import tied_head
    from slmedge.exporter.passes.tied_head import Fp16TiedHeadChunks

    monkeypatch.setattr(tied_head, "CHUNKED_HEAD_MIN_BYTES", 0)  # a tiny head chunked too
    from slmedge.exporter.quantize.graph import unchunk_tied_heads

    once, chunked = _tied(np.float16), _tied(np.float16)
    TiedHeadOnce()(once)
    chunks = Fp16TiedHeadChunks(chunk_bytes=64)  # 11 chunks of one column
    chunks(chunked)
    assert chunks.count == 1 and "Loop" in ops(chunked)
    want = ir.to_proto(once)
    fold_weight_transposes(want)
    back = ir.to_proto(chunked)
    assert unchunk_tied_heads(back) == 1 and unchunk_tied_heads(back) == 0
    got = ir.to_proto(chunked)
    fold_weight_transposes(got)
    for proto in (back, got):
        assert [n.op_type for n in proto.graph.node if n.op_type in ("Loop", "Slice")] == []
    nodes_want, inits_want = _summary(want, numpy_helper.to_array)
    nodes_got, inits_got = _summary(got, numpy_helper.to_array)
    assert nodes_got == nodes_want
    assert list(inits_got) == list(inits_want)
    for name in inits_want:
        np.testing.assert_array_equal(inits_got[name], inits_want[name])
    lazy_proto = ir.to_proto(chunked)
    lazy = LazyWeights(lazy_proto, TensorSource(tmp_path))
    assert lazy_fold(lazy_proto, lazy) == 1
    nodes_lazy, inits_lazy = _summary(lazy_proto, lambda t: lazy.array(t.name))
    assert nodes_lazy == nodes_want
    for name in inits_want:
        np.testing.assert_array_equal(inits_lazy[name], inits_want[name])
