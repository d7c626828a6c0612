"""Packing MatMuls that read one activation; the int8 embedding lookup."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from slmedge.exporter.quantize.pack_matmuls import pack_shared_input_matmuls
from slmedge.exporter.quantize.weight_only import embedding_int8


def _mlp(opset=17, shared_weight=False):
    """gate/up read x, down reads their product; optionally ``up`` reuses gate's weight."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(8, 12)).astype(np.float32), "Wg"),
             numpy_helper.from_array(rng.normal(size=(8, 12)).astype(np.float32), "Wu"),
             numpy_helper.from_array(rng.normal(size=(12, 8)).astype(np.float32), "Wd")]
    gate = helper.make_node("MatMul", ["x", "Wg"], ["g"], name="layers.0.mlp.gate_proj")
    gate.metadata_props.add(key="namespace", value="layers.0.mlp")
    nodes = [gate,
             helper.make_node("MatMul", ["x", "Wg" if shared_weight else "Wu"], ["u"],
                              name="layers.0.mlp.up_proj"),
             helper.make_node("Mul", ["g", "u"], ["p"]),
             helper.make_node("MatMul", ["p", "Wd"], ["y"], name="layers.0.mlp.down_proj")]
    graph = helper.make_graph(nodes, "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _run(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def test_gate_and_up_become_one_matmul_and_a_split():
    model = _mlp()
    x = np.random.default_rng(1).normal(size=(2, 8)).astype(np.float32)
    want = _run(model, {"x": x})
    assert pack_shared_input_matmuls(model) == ["layers.0.mlp.gate_proj"]
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMul") == 2 and ops.count("Split") == 1
    packed = next(n for n in model.graph.node if n.name == "layers.0.mlp.gate_proj")
    assert [(p.key, p.value) for p in packed.metadata_props] == [("namespace", "layers.0.mlp")]
    names = {t.name for t in model.graph.initializer}
    assert "Wg" not in names and "Wu" not in names and "Wd" in names
    np.testing.assert_allclose(_run(model, {"x": x}), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs", [{"shared_weight": True}, {"opset": 11}])
def test_shared_weights_and_old_opsets_are_left_alone(kwargs):
    model = _mlp(**kwargs)
    before = model.SerializeToString()
    assert pack_shared_input_matmuls(model) == []
    assert model.SerializeToString() == before


def _lookup(table):
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed")], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, None])],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(table, "table")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_int8_embedding_is_exact_for_a_q8_0_table_and_close_otherwise():
    rng = np.random.default_rng(2)
    d = rng.uniform(0.001, 0.01, size=(50, 2, 1))
    q = rng.integers(-127, 128, size=(50, 2, 32))
    q[:, :, 0] = 127  # each block reaches its scale, as Q8_0 does
    q8_0 = (d * q).reshape(50, 64).astype(np.float32)
    ids = np.array([[0, 7, 49, 7]])
    for table, exact in ((q8_0, True), (rng.normal(size=(50, 64)).astype(np.float32), False)):
        model = _lookup(table)
        assert embedding_int8(model, ["embed"], 32) == ["embed"]
        node = model.graph.node[0]
        assert node.op_type == "GatherBlockQuantized"
        assert {a.name: helper.get_attribute_value(a) for a in node.attribute}["bits"] == 8
        assert "table" not in {t.name for t in model.graph.initializer}
        got = _run(model, {"ids": ids})[0]
        want = table[ids[0]]
        step = np.abs(want.reshape(4, 2, 32)).max(-1, keepdims=True) / 127
        err = np.abs(got - want).reshape(4, 2, 32)
        if exact:
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
        else:
            assert (err <= step / 2 + 1e-6).all() and err.max() > 0
