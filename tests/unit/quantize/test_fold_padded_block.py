"""Float zero points folded when ``K`` is not a multiple of the block size (issue 16).

MatMulNBits holds ``ceil(K / block_size)`` blocks per column, the last one padded; HQQ writes
float zero points for it as for any block. fold_zero_points.py used to skip such nodes, which
left them on ONNX Runtime's generic path (SmolLM2 ``--block-size 128``, K=576: 90 of 121 nodes,
~10x slower decode). Now the blocksum of the last block sums the rows that exist.
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from slmedge.exporter.quantize.fold_zero_points import fold_float_zero_points


def _node_model(k: int, n: int, bs: int, seed: int = 0) -> onnx.ModelProto:
    """One 4-bit MatMulNBits with random codes, scales and float zero points."""
    rng = np.random.default_rng(seed)
    blocks = -(-k // bs)
    packed = rng.integers(0, 256, size=(n, blocks, bs // 2), dtype=np.uint8)
    scales = (rng.random((n, blocks)) * 0.02 + 0.005).astype(np.float32)
    zp = (rng.random((n, blocks)) * 15).astype(np.float32)  # float: HQQ's kind
    node = helper.make_node("MatMulNBits", ["x", "q", "s", "z"], ["y"], name="mm",
                            domain="com.microsoft", K=k, N=n, bits=4, block_size=bs)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
        [numpy_helper.from_array(packed, "q"), numpy_helper.from_array(scales.reshape(-1), "s"),
         numpy_helper.from_array(zp.reshape(-1), "z")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                   helper.make_opsetid("com.microsoft", 1)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("k, bs", [(80, 32), (576, 128), (40, 64), (96, 32)])
def test_fold_with_a_padded_last_block_computes_the_same(k, bs):
    model = _node_model(k, 24, bs)
    x = np.random.default_rng(1).standard_normal((3, k)).astype(np.float32)
    want = _run(model, x)  # the generic kernel, float zero points as HQQ wrote them
    assert fold_float_zero_points(model) == 1
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    assert len(node.input) == 3  # no zero points left: the integer kernels run
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    indicator = next(v for name, v in inits.items() if "block_indicator" in name)
    assert indicator.shape == (k, -(-k // bs))
    assert indicator.sum(axis=0).tolist() == [min(bs, k - b * bs) for b in range(-(-k // bs))]
    np.testing.assert_allclose(_run(model, x), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_padded_and_whole_blocks_of_the_same_input_share_nothing_wrong():
    """Two nodes on one input, K=80: block 32 (3 blocks, padded) and block 16 (5 whole): each
    gets its own blocksum (the key is the input and its block grid)."""
    a, b = _node_model(80, 8, 32, seed=2), _node_model(80, 8, 16, seed=3)
    nodes, inits = [], []
    for tag, m in (("a", a), ("b", b)):
        node = m.graph.node[0]
        rename = {name: f"{tag}_{name}" for name in ("q", "s", "z", "y")}
        node.input[:] = ["x", *(rename[i] for i in node.input[1:])]
        node.output[:] = [rename["y"]]
        node.name = f"mm_{tag}"
        nodes.append(node)
        for t in m.graph.initializer:
            t.name = rename[t.name]
            inits.append(t)
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 80])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, [None, 8]) for o in ("a_y", "b_y")],
        inits)
    model = helper.make_model(graph, opset_imports=list(a.opset_import))
    x = np.random.default_rng(4).standard_normal((2, 80)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = session.run(None, {"x": x})
    assert fold_float_zero_points(model) == 2
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for got, ref in zip(session.run(None, {"x": x}), want, strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_block_128_on_a_tiny_llama_folds_every_node(tiny_artifact, tmp_path):
    """HQQ at block 128 on a model whose K (64) is below it: ONNX Runtime's HQQ pads the block;
    every node is folded and the logits are the unfolded graph's (fp32 compute: level 1)."""
    from slmedge.exporter.quantize.graph import analyze
    from slmedge.exporter.quantize.recipe import QuantRecipe
    from slmedge.exporter.quantize.weight_only import quantize_weight_only
    from slmedge.runtimes.sessions.onnx_decoder import OnnxDecoder

    model = onnx.load(str(tiny_artifact("llama") / "model.onnx"))
    recipe = QuantRecipe(scheme="int4", block_size=128, accuracy_level=1, lm_head="float")
    model, _ = quantize_weight_only(model, analyze(model), recipe, body_bits=4)
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
    assert any(a["K"] % a["block_size"] for a in attrs), attrs
    plain, folded = tmp_path / "plain.onnx", tmp_path / "folded.onnx"
    onnx.save(model, str(plain))
    assert fold_float_zero_points(model) == len(nodes)
    assert all(len(n.input) == 3 for n in model.graph.node if n.op_type == "MatMulNBits")
    onnx.save(model, str(folded))
    ids = list(range(6, 40))
    want = OnnxDecoder(plain).logits(ids)
    np.testing.assert_allclose(OnnxDecoder(folded).logits(ids), want, rtol=1e-4,
                               atol=1e-4 * np.abs(want).max())
