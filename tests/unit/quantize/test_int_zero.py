"""int_zero.py: integer zero points refit from HQQ's / the min-max grid (issue 16 ablation),
and bench_quant's rewrite of MatMulNBits nodes with them, run by ONNX Runtime."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from slmedge.exporter.quantize.gptq import block_grid, dequantize, pack_matmul_nbits
from slmedge.exporter.quantize.int_zero import from_hqq, int_zero_quantize, rewrite_int_zero
from slmedge.tools.bench import bench_quant


def _rtn(w, bs):
    scale, zero = block_grid(w, bs)
    j = np.clip(np.round(w / np.repeat(scale, bs, 0) + np.repeat(zero, bs, 0)), 0, 15)
    return dequantize(j, scale, zero, bs)


def _q41_like(rng, k, n, bs=32):
    """Blocks ``d * q + m`` with a float offset ``m`` (a Q4_1 GGUF's layout)."""
    d = rng.uniform(0.01, 0.02, (k // bs, n))
    m = rng.uniform(-0.15, -0.05, (k // bs, n))
    q = rng.integers(0, 16, (k, n))
    return np.repeat(d, bs, 0) * q + np.repeat(m, bs, 0)


def test_an_integer_zero_grid_is_recovered_exactly():
    rng = np.random.default_rng(0)
    k, n, bs = 128, 24, 32
    scale = rng.uniform(0.01, 0.03, (k // bs, n))
    zero = rng.integers(3, 12, (k // bs, n)).astype(np.float64)
    j = rng.integers(0, 16, (k, n))
    j[0::bs] = 0  # every block spans the whole code range: min/max is its exact grid
    j[1::bs] = 15
    w = dequantize(j, scale, zero, bs)
    got_j, got_s, got_z = int_zero_quantize(w, bs)
    np.testing.assert_allclose(dequantize(got_j, got_s, got_z, bs), w, atol=1e-12)
    np.testing.assert_array_equal(got_z, zero)


@pytest.mark.parametrize("kind", ["gaussian", "q4_1"])
def test_error_below_rtn_with_integer_zero_points(kind):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((256, 48)) * 0.02 if kind == "gaussian" else _q41_like(rng, 256, 48)
    rtn = ((w - _rtn(w, 32)) ** 2).mean()
    for j, s, z in (int_zero_quantize(w, 32), from_hqq(w, 32)):
        assert j.dtype == np.uint8 and j.max() <= 15
        assert np.array_equal(z, np.round(z)) and z.min() >= 0 and z.max() <= 15
        err = ((w - dequantize(j, s, z, 32)) ** 2).mean()
        # measured: 8% lower on Gaussian weights, ~40% lower on Q4_1-like blocks
        assert err < 0.95 * rtn, (kind, err, rtn)


def test_bad_shapes_are_refused_with_the_shapes():
    with pytest.raises(ValueError, match="K=40 is not a multiple of the block size 32"):
        int_zero_quantize(np.zeros((40, 8)), 32)
    with pytest.raises(ValueError, match=r"must be \[2, 8\]"):
        int_zero_quantize(np.zeros((64, 8)), 32, scale=np.ones((8, 2)), float_zero=np.ones((8, 2)))


def _nbits_model(w, bs):
    k, n = w.shape
    b, sc, zp = pack_matmul_nbits(*int_zero_quantize(w, bs, iters=0), bs)  # a min/max start
    inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(sc.astype(np.float32), "S"),
             numpy_helper.from_array(zp, "Z")]
    node = helper.make_node("MatMulNBits", ["x", "B", "S", "Z"], ["y"], name="proj",
                            domain="com.microsoft", K=k, N=n, bits=4, block_size=bs)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])
    graph = helper.make_graph([node], "g", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                   helper.make_opsetid("com.microsoft", 1)])


def test_rewritten_node_computes_with_the_refit_weights():
    import onnxruntime as ort

    rng = np.random.default_rng(2)
    w = _q41_like(rng, 128, 16)
    model = _nbits_model(w, 32)
    inits = {t.name: t for t in model.graph.initializer}
    before = bench_quant._nbits_weight(model.graph.node[0], inits)
    assert rewrite_int_zero(model, lambda node: w) == 1
    after = bench_quant._nbits_weight(model.graph.node[0], inits)
    np.testing.assert_allclose(after, dequantize(*from_hqq(w, 32), 32), rtol=1e-6, atol=1e-7)
    assert ((w - after) ** 2).mean() < ((w - before) ** 2).mean()
    x = rng.standard_normal((1, 128)).astype(np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], x @ after, rtol=1e-4, atol=1e-4)


def test_nodes_without_a_float_weight_are_left_alone():
    w = _q41_like(np.random.default_rng(3), 64, 8)
    model = _nbits_model(w, 32)
    before = onnx.ModelProto()
    before.CopyFrom(model)
    assert rewrite_int_zero(model, lambda node: None) == 0
    assert model == before


def _attr(node, name):
    return next(a.i for a in node.attribute if a.name == name)


def test_bench_rewrite_of_a_tiny_llama_finds_every_4bit_weight(tiny_artifact, tmp_path):
    """bench_quant.rewrite_int_zero maps each 4-bit node (q/k/v packed at export, gate/up
    packed by the quantizer at block 64) to its fp32 weights and writes a graph ONNX Runtime
    runs, closer to the fp32 weights than the RTN graph it came from."""
    from onnx import numpy_helper

    from slmedge.exporter.quantize.pipeline import QualityConfig, quantize_artifact
    from slmedge.exporter.quantize.recipe import QuantRecipe
    from slmedge.runtimes.sessions.onnx_decoder import OnnxDecoder

    fp32 = tiny_artifact("llama")
    rtn = tmp_path / "rtn"
    quantize_artifact(fp32, rtn, QuantRecipe(scheme="int4", algorithm="rtn", block_size=32,
                                             mlp_block_size=64),
                      QualityConfig(eval_tokens=64, max_ppl_increase=1000, max_kl_mean=100,
                                    min_top1_agreement=0))
    out = bench_quant.rewrite_int_zero(fp32, rtn, tmp_path / "intzero")
    before, after = (onnx.load(str(p / "model.onnx")) for p in (rtn, out))
    nodes = [(n, m) for n, m in zip(before.graph.node, after.graph.node, strict=True)
             if n.op_type == "MatMulNBits" and _attr(n, "bits") == 4]
    assert nodes and any(_attr(n, "block_size") == 64 for n, _ in nodes)
    ref = onnx.load(str(fp32 / "model.onnx"))
    ref_w = {t.name: numpy_helper.to_array(t) for t in ref.graph.initializer}
    b_inits = {t.name: t for t in before.graph.initializer}
    a_inits = {t.name: t for t in after.graph.initializer}
    by_input = {}
    for n in ref.graph.node:
        if n.op_type == "MatMul" and n.input[1] in ref_w:
            by_input.setdefault(n.input[0], []).append(ref_w[n.input[1]])
    for old, new in nodes:
        w = np.concatenate(by_input[old.input[0]], axis=1)
        w_old = bench_quant._nbits_weight(old, b_inits)
        w_new = bench_quant._nbits_weight(new, a_inits)
        assert w.shape == w_new.shape
        assert ((w - w_new) ** 2).sum() < ((w - w_old) ** 2).sum(), new.name
    ids = [1, 5, 9, 3]
    got = OnnxDecoder(str(out / "model.onnx")).logits(ids)
    assert got.shape == OnnxDecoder(str(fp32 / "model.onnx")).logits(ids).shape
    assert np.isfinite(got).all()
