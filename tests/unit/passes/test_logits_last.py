"""logits_to_keep: 0 keeps every position, k the last k."""

import numpy as np
from onnx import helper
from pass_graphs import F, I64, const, model, run

from slmedge.exporter.passes.logits_last import LogitsToKeep


def test_logits_to_keep_slices_the_lm_head_input():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Mul", ["h", "s"], ["hs"]),
             helper.make_node("MatMul", ["hs", "w"], ["logits"])]
    inits = [const("s", np.array(2.0, np.float32)), const("w", rng.standard_normal((4, 10)).astype(np.float32))]
    m = model(nodes, [("h", F, ["batch", "seq", 4])], [("logits", F, ["batch", "seq", 10])], inits)
    h = rng.standard_normal((2, 5, 4)).astype(np.float32)
    want = run(m, {"h": h})[0]
    fusion = LogitsToKeep()
    fusion(m)
    assert fusion.count == 1
    assert [v.name for v in m.graph.inputs] == ["h", "logits_to_keep"]
    keep = {"h": h, "logits_to_keep": np.array(0, np.int64)}
    np.testing.assert_allclose(run(m, keep)[0], want, atol=1e-6)
    keep["logits_to_keep"] = np.array(1, np.int64)
    last = run(m, keep)[0]
    assert last.shape == (2, 1, 10)
    np.testing.assert_allclose(last, want[:, -1:], atol=1e-6)
    keep["logits_to_keep"] = np.array(3, np.int64)
    np.testing.assert_allclose(run(m, keep)[0], want[:, -3:], atol=1e-6)
    assert I64


def test_graph_without_lm_head_matmul_is_left_alone_with_a_reason():
    m = model([helper.make_node("Relu", ["h"], ["logits"])], [("h", F, [1, 2, 3])],
              [("logits", F, [1, 2, 3])])
    fusion = LogitsToKeep()
    fusion(m)
    assert fusion.count == 0 and "MatMul" in fusion.reasons[0]
