"""MatMulNBits from ORT's quantizer, checked in quantization steps on a 1-node graph.

For round-to-nearest weights the error of one output is bounded exactly by
sum_k |x_k| * scale(k, n) / 2 (each weight moves by at most half a step); with int8
activations (accuracy level 4) the activation rounding adds sum_k |w_k| * a_step / 2.
The bound is computed from the scales the quantizer wrote, so the test holds the
quantizer to its own grid (ExecuTorch-style tolerance in quantization steps).
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from slmedge.exporter.quantize.graph import analyze
from slmedge.exporter.quantize.recipe import QuantRecipe
from slmedge.exporter.quantize.weight_only import quantize_weight_only

K, N = 128, 48


def _one_matmul(w: np.ndarray) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, N])
    node = helper.make_node("MatMul", ["x", "w"], ["logits"], name="proj")
    graph = helper.make_graph([node], "g", [x], [y], [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _scales(model) -> np.ndarray:
    """Per (k, n) weight step from the MatMulNBits scales [N, K/block]."""
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    scales = inits[node.input[2]].reshape(N, -1)
    return np.repeat(scales, attrs["block_size"], axis=1)[:, :K].T, attrs  # [K, N]


@pytest.mark.parametrize("block,symmetric", [(32, False), (64, True), (128, False)])
def test_rtn_error_within_half_a_step_per_weight(block, symmetric):
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.05, (K, N)).astype(np.float32)
    x = rng.normal(0, 1, (5, K)).astype(np.float32)
    model = _one_matmul(w)
    facts = analyze(model)
    # The lone MatMul is the lm_head here; quantize it at 4 bits like the body.
    recipe = QuantRecipe(scheme="int4", algorithm="rtn", block_size=block, symmetric=symmetric,
                         accuracy_level=1, lm_head="int4")
    q, precision = quantize_weight_only(model, facts, recipe, body_bits=4)
    assert precision == {"proj": "int4"}
    step, attrs = _scales(q)
    assert (attrs["bits"], attrs["block_size"], attrs["accuracy_level"]) == (4, block, 1)
    assert ("MatMulNBits" in {n.op_type for n in q.graph.node})
    got, want = _run(q, x), x @ w
    bound = np.abs(x) @ (np.abs(step) / 2) + 1e-5
    assert np.all(np.abs(got - want) <= bound)
    # ... and it is a real quantization, not a pass-through.
    assert np.abs(got - want).max() > 1e-4


def test_int8_activations_add_at_most_half_an_activation_step():
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.05, (K, N)).astype(np.float32)
    x = rng.normal(0, 1, (3, K)).astype(np.float32)
    model = _one_matmul(w)
    recipe = QuantRecipe(scheme="int4", algorithm="rtn", block_size=32, accuracy_level=4,
                         lm_head="int4")
    q, _ = quantize_weight_only(model, analyze(model), recipe, body_bits=4)
    step, attrs = _scales(q)
    assert attrs["accuracy_level"] == 4
    got, want = _run(q, x), x @ w
    # Activations are quantized per block of the K axis to int8 (scale = max|x| / 127).
    a_step = np.concatenate(
        [np.repeat(np.abs(x[:, i : i + 32]).max(1, keepdims=True) / 127, 32, 1) for i in range(0, K, 32)],
        axis=1)
    w_abs_max = np.abs(w) + np.abs(step)  # |dequantized weight| <= |w| + one step
    bound = np.abs(x) @ (np.abs(step) / 2) + (a_step / 2) @ w_abs_max + 1e-4
    assert np.all(np.abs(got - want) <= bound)


def test_hqq_is_the_default_and_writes_float_zero_points():
    rng = np.random.default_rng(3)
    w = rng.normal(0, 0.05, (K, N)).astype(np.float32)
    model = _one_matmul(w)
    recipe = QuantRecipe(scheme="int4", block_size=32, lm_head="int4", accuracy_level=1)
    assert recipe.int4_algorithm.value == "hqq" and recipe.label().startswith("int4-hqq-b32")
    q, _ = quantize_weight_only(model, analyze(model), recipe, body_bits=4)
    node = next(n for n in q.graph.node if n.op_type == "MatMulNBits")
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    assert inits[node.input[3]].dtype == np.float32  # HQQ: zero points in float
    assert {a.name: helper.get_attribute_value(a) for a in node.attribute}["accuracy_level"] == 1
    x = rng.normal(0, 1, (4, K)).astype(np.float32)
    step, _ = _scales(q)
    # Float zero points: each weight sits within one step of the grid it was rounded to.
    assert np.all(np.abs(_run(q, x) - x @ w) <= np.abs(x) @ np.abs(step) + 1e-5)
    assert QuantRecipe(scheme="int4", symmetric=True).int4_algorithm.value == "rtn"


def test_lm_head_int8_and_body_int4_in_one_graph():
    rng = np.random.default_rng(2)
    w1 = rng.normal(0, 0.05, (K, K)).astype(np.float32)
    w2 = rng.normal(0, 0.05, (K, N)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, N])
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="body"),
             helper.make_node("MatMul", ["h", "w2"], ["logits"], name="head")]
    graph = helper.make_graph(nodes, "g", [x], [y],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    facts = analyze(model)
    assert facts.lm_head == "head"
    q, precision = quantize_weight_only(model, facts, QuantRecipe(scheme="int4"), body_bits=4)
    assert precision == {"body": "int4", "head": "int8"}
    bits = {n.name: {a.name: helper.get_attribute_value(a) for a in n.attribute}["bits"]
            for n in q.graph.node if n.op_type == "MatMulNBits"}
    assert bits == {"body_Q4": 4, "head_Q8": 8}
