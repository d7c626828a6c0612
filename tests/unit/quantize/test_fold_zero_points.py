"""Folding MatMulNBits' float zero points into ``blocksum(x) @ M`` keeps the numerics."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from slmedge.exporter.quantize.fold_zero_points import fold_float_zero_points


def _nbits_model(k, n, block, *, zp_kind="float", bias=False, seed=0):
    """One MatMulNBits (4 bits) with random weights; ``zp_kind`` float, uint8 or none."""
    rng = np.random.default_rng(seed)
    blocks = -(-k // block)
    q = rng.integers(0, 16, size=(n, blocks * block), dtype=np.uint8)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(n, blocks, block // 2)
    scales = rng.uniform(0.01, 0.1, size=n * blocks).astype(np.float32)
    inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "scales")]
    inputs = ["x", "B", "scales"]
    if zp_kind == "float":
        inits.append(numpy_helper.from_array(
            rng.uniform(0, 15, size=n * blocks).astype(np.float32), "zp"))
        inputs.append("zp")
    elif zp_kind == "uint8":
        zq = rng.integers(0, 16, size=(n, blocks + blocks % 2), dtype=np.uint8)
        inits.append(numpy_helper.from_array((zq[:, 0::2] | (zq[:, 1::2] << 4)).reshape(-1), "zp"))
        inputs.append("zp")
    if bias:
        inits.append(numpy_helper.from_array(rng.normal(size=n).astype(np.float32), "bias"))
        inputs += [""] * (5 - len(inputs)) + ["bias"]
    node = helper.make_node("MatMulNBits", inputs, ["y"], name="proj", domain="com.microsoft",
                            K=k, N=n, bits=4, block_size=block)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],  # any rank
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)])


def _run(model, x):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("k,n,block,bias", [(64, 32, 32, False), (128, 32, 16, False),
                                            (64, 32, 32, True)])
def test_folded_graph_computes_the_same(k, n, block, bias):
    model = _nbits_model(k, n, block, bias=bias)
    x = np.random.default_rng(1).normal(size=(2, 5, k)).astype(np.float32)
    want = _run(model, x)
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    assert fold_float_zero_points(folded) == 1
    nbits = [nd for nd in folded.graph.node if nd.op_type == "MatMulNBits"]
    assert len(nbits) == 1 and (len(nbits[0].input) < 4 or not nbits[0].input[3])
    assert bias == (len(nbits[0].input) == 6 and nbits[0].input[5] == "bias")
    assert "zp" not in {t.name for t in folded.graph.initializer}
    got = _run(folded, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # also for 2-D input: the blocksum keeps whatever leading dims x has
    np.testing.assert_allclose(_run(folded, x[0]), _run(model, x[0]), rtol=1e-4,
                               atol=1e-4 * np.abs(want).max())


def test_default_zero_point_is_eight():
    """The fold relies on MatMulNBits without zero_points meaning q - 8 (4 bits)."""
    model = _nbits_model(64, 8, 32, zp_kind="none")
    x = np.random.default_rng(2).normal(size=(1, 3, 64)).astype(np.float32)
    b = numpy_helper.to_array(model.graph.initializer[0]).reshape(8, -1)
    q = np.stack([b & 15, b >> 4], axis=-1).reshape(8, 2, 32).astype(np.float32)
    s = numpy_helper.to_array(model.graph.initializer[1]).reshape(8, 2, 1)
    w = ((q - 8.0) * s).reshape(8, 64).T
    np.testing.assert_allclose(_run(model, x), x @ w, rtol=1e-4, atol=1e-5)


# a K that is not a multiple of the block is folded (test_fold_padded_block.py)
@pytest.mark.parametrize("k,block,zp_kind", [(64, 32, "uint8"), (48, 32, "uint8")])
def test_integer_zero_points_are_left_alone(k, block, zp_kind):
    model = _nbits_model(k, 16, block, zp_kind=zp_kind)
    before = model.SerializeToString()
    assert fold_float_zero_points(model) == 0
    assert model.SerializeToString() == before


def test_hqq_int4_of_tiny_llama_is_folded_and_unchanged(tiny_artifact, tmp_path, monkeypatch):
    from slmedge.exporter.quantize import core
    from slmedge.exporter.quantize.core import quantize_model
    from slmedge.exporter.quantize.recipe import QuantRecipe
    from slmedge.runtimes.sessions.onnx_decoder import OnnxDecoder

    art = tiny_artifact("llama")
    # fp32 compute: exact (the lm_head float: the int4 scheme's 8-bit nodes are level 4)
    recipe = QuantRecipe(scheme="int4", block_size=32, accuracy_level=1, lm_head="float")
    assert recipe.int4_algorithm.value == "hqq"
    folded, plain = tmp_path / "folded.onnx", tmp_path / "plain.onnx"
    report = quantize_model(art / "model.onnx", folded, recipe, tokenizer_dir=art)
    monkeypatch.setattr(core, "fold_float_zero_points", lambda _m: 0)
    quantize_model(art / "model.onnx", plain, recipe, tokenizer_dir=art)
    assert report.zero_points == "folded"

    def float_zps(path):
        m = onnx.load(str(path))
        inits = {t.name: t.data_type for t in m.graph.initializer}
        return [nd.name for nd in m.graph.node if nd.op_type == "MatMulNBits"
                and len(nd.input) > 3 and inits.get(nd.input[3]) == TensorProto.FLOAT]

    assert float_zps(folded) == [] and float_zps(plain)
    ids = list(range(6, 40))
    want = OnnxDecoder(plain).logits(ids)
    got = OnnxDecoder(folded).logits(ids)
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * scale + 1e-5)
