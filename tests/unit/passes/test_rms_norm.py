"""RMSNorm and residual + RMSNorm -> SimplifiedLayerNormalization / SkipSimplified..."""

import numpy as np
from onnx import helper
from pass_graphs import F, const, model, ops, run

from slmedge.exporter.passes.rms_norm import RmsNormFusion
from slmedge.exporter.passes.skip_rms_norm import SkipRmsNormFusion

D = 8


def _rms_nodes(x, out):
    return [
        helper.make_node("Pow", [x, "two"], [f"{out}_sq"]),
        helper.make_node("ReduceMean", [f"{out}_sq", "axes"], [f"{out}_ms"], keepdims=1,
                         noop_with_empty_axes=0),
        helper.make_node("Add", [f"{out}_ms", "eps"], [f"{out}_mse"]),
        helper.make_node("Sqrt", [f"{out}_mse"], [f"{out}_rms"]),
        helper.make_node("Reciprocal", [f"{out}_rms"], [f"{out}_inv"]),
        helper.make_node("Mul", [x, f"{out}_inv"], [f"{out}_n"]),
        helper.make_node("Mul", ["w", f"{out}_n"], [out]),
    ]


def _inits():
    rng = np.random.default_rng(0)
    return [const("two", np.array(2.0, np.float32)), const("axes", np.array([-1], np.int64)),
            const("eps", np.array(1e-5, np.float32)),
            const("w", rng.standard_normal(D).astype(np.float32))]


def test_rms_norm_becomes_one_node_with_same_values():
    m = model(_rms_nodes("x", "y"), [("x", F, [2, 3, D])], [("y", F, [2, 3, D])], _inits())
    x = np.random.default_rng(1).standard_normal((2, 3, D)).astype(np.float32)
    want = run(m, {"x": x})[0]
    fusion = RmsNormFusion()
    fusion(m)
    assert fusion.count == 1 and ops(m) == ["SimplifiedLayerNormalization"]
    np.testing.assert_allclose(run(m, {"x": x})[0], want, atol=1e-5)


def test_residual_add_then_rms_norm_becomes_skip_norm_with_both_outputs():
    nodes = [helper.make_node("Add", ["a", "b"], ["s"]), *_rms_nodes("s", "y")]
    m = model(nodes, [("a", F, [1, 4, D]), ("b", F, [1, 4, D])],
              [("y", F, [1, 4, D]), ("s", F, [1, 4, D])], _inits())
    rng = np.random.default_rng(2)
    feeds = {k: rng.standard_normal((1, 4, D)).astype(np.float32) for k in "ab"}
    want = run(m, feeds)
    RmsNormFusion()(m)
    skip = SkipRmsNormFusion()
    skip(m)
    assert skip.count == 1 and ops(m) == ["SkipSimplifiedLayerNormalization"]
    for got, ref in zip(run(m, feeds), want):
        np.testing.assert_allclose(got, ref, atol=1e-5)
