"""gptq-act: fixed min/max grids, Hessian-aware rounding, MatMulNBits layout, statistics."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from slmedge.exporter.quantize.gptq import (
    block_grid, collect_hessians, dequantize, gptq_quantize, rewrite_matmul_nbits,
)


def _q4_1_weights(k, n, rng, *, integer_offsets=False):
    """Weights as a Q4_1 GGUF stores them: ``d * q + m`` per 32-block, each block using
    the codes 0 and 15 (so its min/max grid is ``d``)."""
    blocks = k // 32
    d = rng.uniform(0.01, 0.05, size=(blocks, 1, n))
    q = rng.integers(0, 16, size=(blocks, 32, n)).astype(np.float64)
    q[:, 0], q[:, 1] = 0, 15
    if integer_offsets:
        m = -d * rng.integers(0, 16, size=(blocks, 1, n))
    else:
        m = -d * rng.uniform(0, 15, size=(blocks, 1, n))
    return (d * q + m).reshape(k, n), d.reshape(blocks, n)


def _activations(rows, k, rng):
    """Correlated inputs with a few large channels, as a decoder's normed activations."""
    mix = rng.normal(size=(k, k)) / np.sqrt(k) + np.eye(k)
    x = rng.normal(size=(rows, k)) @ mix
    x[:, rng.choice(k, 3, replace=False)] *= 12.0
    return x


def test_grid_of_q4_1_weights_is_their_own_scale():
    rng = np.random.default_rng(0)
    w, d = _q4_1_weights(96, 8, rng)
    scale, zero = block_grid(w, 32)
    np.testing.assert_allclose(scale, d, rtol=1e-12)
    assert zero.min() >= 0 and zero.max() <= 15 and np.array_equal(zero, np.round(zero))


def test_q4_1_weights_with_integer_offsets_come_back_exactly():
    rng = np.random.default_rng(1)
    w, _ = _q4_1_weights(64, 16, rng, integer_offsets=True)
    h = np.cov(_activations(256, 64, rng), rowvar=False)
    j, scale, zero = gptq_quantize(w, h, 32)
    np.testing.assert_allclose(dequantize(j, scale, zero, 32), w, atol=1e-12)


def test_gptq_lowers_the_output_error_against_rounding_on_the_same_grid():
    rng = np.random.default_rng(2)
    k, n = 128, 64
    w, _ = _q4_1_weights(k, n, rng)  # offsets off the grid: every block must round
    x = _activations(2048, k, rng)
    h = x.T @ x / len(x)
    j, scale, zero = gptq_quantize(w, h, 32)
    assert j.dtype == np.uint8 and j.max() <= 15
    rtn = np.repeat(scale, 32, 0) * (np.clip(np.round(w / np.repeat(scale, 32, 0)
                                                      + np.repeat(zero, 32, 0)), 0, 15)
                                     - np.repeat(zero, 32, 0))
    err_gptq = np.linalg.norm(x @ (w - dequantize(j, scale, zero, 32)))
    err_rtn = np.linalg.norm(x @ (w - rtn))
    assert err_gptq < 0.75 * err_rtn, (err_gptq, err_rtn)  # 0.61 with this seed


@pytest.mark.parametrize("k,n", [(96, 24), (64, 10)])  # 3 blocks: an odd zero-point nibble
def test_rewritten_matmul_nbits_computes_the_dequantized_weights(k, n):
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    rng = np.random.default_rng(3)
    w = rng.normal(size=(k, n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="proj")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
        [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    algo = mnq.DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=False, accuracy_level=1)
    quantizer = mnq.MatMulNBitsQuantizer(model, algo_config=algo)
    quantizer.process()
    q = quantizer.model.model
    x = _activations(64, k, rng).astype(np.float32)
    h = x.T.astype(np.float64) @ x / len(x)
    assert rewrite_matmul_nbits(q, {"y": w}, {"x": h}) == 1
    j, scale, zero = gptq_quantize(w.astype(np.float64), h, 32)
    sess = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x})[0]
    want = x @ dequantize(j, scale, zero, 32)
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=0)


def test_rewrite_refuses_nodes_without_zero_points():
    rng = np.random.default_rng(4)
    k, n = 64, 8
    packed = rng.integers(0, 255, size=(n, k // 32, 16), dtype=np.uint8)
    node = helper.make_node("MatMulNBits", ["x", "B", "s"], ["y"], name="proj",
                            domain="com.microsoft", K=k, N=n, bits=4, block_size=32)
    graph = helper.make_graph([node], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(packed, "B"),
                               numpy_helper.from_array(np.ones(n * 2, np.float32), "s")])
    model = helper.make_model(graph)
    with pytest.raises(ValueError, match="with zero points"):
        rewrite_matmul_nbits(model, {"y": rng.normal(size=(k, n))}, {"x": np.eye(k)})


def test_gptq_checks_its_shapes():
    with pytest.raises(ValueError, match="multiple of the block size"):
        gptq_quantize(np.zeros((40, 4)), np.eye(40), 32)
    with pytest.raises(ValueError, match="does not match K=64"):
        gptq_quantize(np.zeros((64, 4)), np.eye(32), 32)


def _two_layer_model(tmp_path):
    """x -> MatMul(W1) -> Relu -> MatMul(W2), weights in an external data file."""
    rng = np.random.default_rng(5)
    w1 = rng.normal(size=(8, 16)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["a"]),
         helper.make_node("MatMul", ["a", "W2"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
        [numpy_helper.from_array(w1, "W1"),
         numpy_helper.from_array(rng.normal(size=(16, 4)).astype(np.float32), "W2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="m.onnx.data",
              size_threshold=0)
    return path, w1


@pytest.mark.parametrize("budget", [1 << 30, 1])  # one pass, or one pass per activation
def test_hessians_are_the_inputs_second_moments(tmp_path, budget):
    path, w1 = _two_layer_model(tmp_path)
    rng = np.random.default_rng(6)
    feeds = [{"x": rng.normal(size=(r, 8)).astype(np.float32)} for r in (3, 5, 1)]
    got = collect_hessians(path, {"x": 8, "a": 16}, lambda: iter(feeds), budget_bytes=budget)
    x = np.concatenate([f["x"] for f in feeds]).astype(np.float64)
    a = np.maximum(x @ w1.astype(np.float64), 0)
    np.testing.assert_allclose(got["x"], x.T @ x / len(x), rtol=1e-5)
    np.testing.assert_allclose(got["a"], a.T @ a / len(a), rtol=1e-4, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]  # probe gone


def test_hessians_name_an_unknown_activation(tmp_path):
    path, _ = _two_layer_model(tmp_path)
    with pytest.raises(ValueError, match="no activation named"):
        collect_hessians(path, {"nope": 4}, lambda: iter([]))
