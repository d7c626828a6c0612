"""GELU variants -> FastGelu / com.microsoft Gelu, with the bias folded in."""

import math

import numpy as np
from onnx import helper
from pass_graphs import F, const, model, ops, run

from slmedge.exporter.passes.gelu import GeluFusion


def _gpt2_gelu(x, out):
    # 0.5*x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))), GPT-2's association
    return [
        helper.make_node("Mul", [x, "half"], ["h"]),
        helper.make_node("Pow", [x, "three"], ["p"]),
        helper.make_node("Mul", ["p", "k"], ["pk"]),
        helper.make_node("Add", [x, "pk"], ["inner"]),
        helper.make_node("Mul", ["inner", "c"], ["ic"]),
        helper.make_node("Tanh", ["ic"], ["t"]),
        helper.make_node("Add", ["t", "one"], ["t1"]),
        helper.make_node("Mul", ["h", "t1"], [out]),
    ]


def _consts():
    return [const("half", np.array(0.5, np.float32)), const("three", np.array(3.0, np.float32)),
            const("k", np.array(0.044715, np.float32)),
            const("c", np.array(math.sqrt(2 / math.pi), np.float32)),
            const("one", np.array(1.0, np.float32))]


def test_gpt2_tanh_gelu_with_bias_becomes_fastgelu_with_bias():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["z"]),
             *_gpt2_gelu("z", "y")]
    inits = [*_consts(), const("w", rng.standard_normal((6, 8)).astype(np.float32)),
             const("b", rng.standard_normal(8).astype(np.float32))]
    m = model(nodes, [("x", F, [1, 3, 6])], [("y", F, [1, 3, 8])], inits)
    x = rng.standard_normal((1, 3, 6)).astype(np.float32)
    want = run(m, {"x": x})[0]
    fusion = GeluFusion()
    fusion(m)
    assert fusion.count == 1 and fusion.bias == 1
    assert ops(m) == ["MatMul", "FastGelu"]
    np.testing.assert_allclose(run(m, {"x": x})[0], want, atol=1e-5)


def test_onnx_gelu_tanh_and_erf_become_contrib_ops():
    nodes = [helper.make_node("Gelu", ["x"], ["a"], approximate="tanh"),
             helper.make_node("Gelu", ["x"], ["b"])]
    m = model(nodes, [("x", F, [4, 8])], [("a", F, [4, 8]), ("b", F, [4, 8])], opset=20)
    x = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    want = run(m, {"x": x})
    fusion = GeluFusion()
    fusion(m)
    assert fusion.count == 2
    assert sorted(ops(m)) == ["FastGelu", "Gelu"]
    assert all(n.domain == "com.microsoft" for n in m.graph)
    for got, ref in zip(run(m, {"x": x}), want):
        np.testing.assert_allclose(got, ref, atol=1e-5)
