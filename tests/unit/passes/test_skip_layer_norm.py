"""GPT-2: Gemm between reshapes -> 3-D MatMul + Add; residual Add + LayerNorm -> SkipLayerNorm."""

import numpy as np
from onnx import helper
from pass_graphs import F, const, model, ops, run

from slmedge.exporter.passes.linear_3d import Linear3dFusion
from slmedge.exporter.passes.skip_layer_norm import SkipLayerNormFusion

D = 8


def test_reshape_gemm_reshape_becomes_matmul_add_on_3d():
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Reshape", ["x", "flat"], ["x2"]),
        helper.make_node("Gemm", ["x2", "w", "b"], ["g"]),
        helper.make_node("Reshape", ["g", "back"], ["y"]),
    ]
    inits = [const("flat", np.array([-1, D], np.int64)), const("back", np.array([2, 3, 4], np.int64)),
             const("w", rng.standard_normal((D, 4)).astype(np.float32)),
             const("b", rng.standard_normal(4).astype(np.float32))]
    m = model(nodes, [("x", F, [2, 3, D])], [("y", F, [2, 3, 4])], inits)
    x = rng.standard_normal((2, 3, D)).astype(np.float32)
    want = run(m, {"x": x})[0]
    fusion = Linear3dFusion()
    fusion(m)
    assert fusion.count == 1 and ops(m) == ["MatMul", "Add"]
    np.testing.assert_allclose(run(m, {"x": x})[0], want, atol=1e-5)


def test_residual_add_then_layer_norm_becomes_skip_layer_norm():
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Add", ["a", "b"], ["s"]),
             helper.make_node("LayerNormalization", ["s", "g", "beta"], ["y"], axis=-1, epsilon=1e-5)]
    inits = [const("g", rng.standard_normal(D).astype(np.float32)),
             const("beta", rng.standard_normal(D).astype(np.float32))]
    m = model(nodes, [("a", F, [1, 5, D]), ("b", F, [1, 5, D])],
              [("y", F, [1, 5, D]), ("s", F, [1, 5, D])], inits)
    feeds = {k: rng.standard_normal((1, 5, D)).astype(np.float32) for k in "ab"}
    want = run(m, feeds)
    fusion = SkipLayerNormFusion()
    fusion(m)
    assert fusion.count == 1 and ops(m) == ["SkipLayerNormalization"]
    for got, ref in zip(run(m, feeds), want):
        np.testing.assert_allclose(got, ref, atol=1e-5)
