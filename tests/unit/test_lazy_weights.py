"""lazy_weights.contiguous: the fast copy of the weights' transposes writes numpy's bytes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from slmedge.exporter.onnx.lazy_weights import contiguous, lazy_apply


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int64])
def test_contiguous_of_a_large_transpose_is_numpys_copy(dtype):
    # above the 1 << 20 elements where the torch copy is used
    w = (np.random.default_rng(0).standard_normal((1031, 1100)) * 100).astype(dtype)
    views = (w.T, np.transpose(w.reshape(1031, 11, 100), (2, 0, 1)), w.T.reshape(1, 1100, 1031))
    for view in views:
        got = contiguous(view)
        assert got.flags.c_contiguous and got.dtype == view.dtype and got.shape == view.shape
        assert got.tobytes() == np.ascontiguousarray(view).tobytes()


def test_contiguous_keeps_arrays_torch_cannot_take():
    w = np.arange(1100 * 1000, dtype=np.float32).reshape(1100, 1000)
    flipped = w[::-1].T  # negative strides: torch.from_numpy refuses them
    assert contiguous(flipped).tobytes() == np.ascontiguousarray(flipped).tobytes()
    assert contiguous(w) is w  # already contiguous: no copy


def test_lazy_apply_writes_the_transposed_weight():
    w = np.random.default_rng(1).standard_normal((1200, 900)).astype(np.float32)
    source = ir.Tensor(w, name="w")
    lazy = lazy_apply(lambda a: a.T.reshape(1, 900, 1200), [source], dtype=ir.DataType.FLOAT,
                      shape=[1, 900, 1200], name="w_T")
    assert lazy.numpy().tobytes() == np.ascontiguousarray(w.T).reshape(1, 900, 1200).tobytes()
    assert lazy.tobytes() == lazy.numpy().tobytes()
