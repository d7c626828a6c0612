"""hqq.py gives the bytes ONNX Runtime's HQQWeightOnlyQuantizer writes (packed weights, scales,
float zero points), on fp32 and fp16 weights, 4 and 8 bits, several block sizes, with
constant blocks (zero range) and an outlier row."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from slmedge.exporter.quantize.hqq import hqq_quantize


def _ort_hqq(w: np.ndarray, bits: int, block: int) -> dict[str, np.ndarray]:
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="m")
    config = mnq.HQQWeightOnlyQuantConfig(block_size=block, bits=bits,
                                          op_types_to_quantize=("MatMul",))
    graph = onnx.GraphProto(initializer=[numpy_helper.from_array(w, "w")])
    mnq.HQQWeightOnlyQuantizer(config).quantize(node, [graph])
    return {t.name: numpy_helper.to_array(t) for t in graph.initializer}


@pytest.mark.parametrize("shape,bits,block,dtype", [
    ((256, 384), 4, 32, np.float32),   # more rows than one slice (hqq.SLICE_VALUES)
    ((384, 96), 4, 64, np.float16),
    ((128, 40), 8, 32, np.float32),
    ((64, 24), 4, 16, np.float32),
    ((256, 48), 4, 128, np.float32),
])
def test_same_bytes_as_onnxruntime(shape, bits, block, dtype, monkeypatch):
    import slmedge.exporter.quantize.hqq as hqq

    monkeypatch.setattr(hqq, "SLICE_VALUES", 2048)  # many slices, uneven last one
    rng = np.random.default_rng(7)
    w = (rng.standard_normal(shape) * 0.02).astype(dtype)
    w[:, 0] = 0.25  # constant blocks: zero range
    w[3, :] *= 40  # an outlier row
    ref = _ort_hqq(w, bits, block)
    packed, scales, zero_points = hqq_quantize(w, bits, block)
    assert packed.dtype == np.uint8 and packed.shape == ref[f"w_Q{bits}"].shape
    assert np.array_equal(packed, ref[f"w_Q{bits}"])
    assert scales.dtype == ref["w_scales"].dtype and scales.tobytes() == ref["w_scales"].tobytes()
    assert zero_points.dtype == ref["w_zero_points"].dtype
    assert zero_points.tobytes() == ref["w_zero_points"].tobytes()


def test_dequantized_weights_are_close_to_the_input():
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((128, 16)) * 0.02).astype(np.float32)
    packed, scales, zp = hqq_quantize(w, 4, 32)
    q = np.stack([packed & 15, packed >> 4], axis=-1).reshape(16, 128).astype(np.float32)
    deq = (q.reshape(16, 4, 32) - zp.reshape(16, 4, 1)) * scales.reshape(16, 4, 1)
    err = np.abs(deq.reshape(16, 128).T - w)
    assert err.max() < np.abs(w).max() / 7  # within about one step of a 16-level grid


def test_refuses_what_it_does_not_do():
    with pytest.raises(ValueError, match="multiple of the block"):
        hqq_quantize(np.zeros((40, 8), np.float32), 4, 32)
    with pytest.raises(ValueError, match="more than one block"):
        hqq_quantize(np.zeros((32, 8), np.float32), 4, 32)
