"""Cleanup: constants folded, no-op shape ops dropped, values unchanged."""

import numpy as np
from onnx import helper
from pass_graphs import F, I64, const, model, ops, run

from slmedge.exporter.passes.cleanup import CleanupPass, NoOpEliminationPass


def test_noop_transpose_slice_mul_are_dropped_and_result_is_unchanged():
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[0, 1]),
        helper.make_node("Slice", ["t", "zero", "big", "zero"], ["s"]),
        helper.make_node("Mul", ["s", "one"], ["m"]),
        helper.make_node("Add", ["m", "x"], ["y"]),
    ]
    inits = [const("zero", np.array([0], np.int64)), const("big", np.array([2**63 - 1], np.int64)),
             const("one", np.array(1.0, np.float32))]
    m = model(nodes, [("x", F, [2, 3])], [("y", F, [2, 3])], inits)
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    want = run(m, {"x": x})[0]
    NoOpEliminationPass()(m)
    assert ops(m) == ["Add"]
    np.testing.assert_array_equal(run(m, {"x": x})[0], want)


def test_mul_by_one_that_broadcasts_is_kept():
    nodes = [helper.make_node("Mul", ["x", "one"], ["y"])]
    m = model(nodes, [("x", F, [3])], [("y", F, [1, 3])],
              [const("one", np.ones((1, 1), np.float32))])
    NoOpEliminationPass()(m)
    assert ops(m) == ["Mul"]  # [1,1] * [3] is [1,3]: not a no-op


def test_constant_shape_arithmetic_is_folded():
    nodes = [
        helper.make_node("Shape", ["w"], ["s"]),
        helper.make_node("Reshape", ["x", "s"], ["y"]),
    ]
    m = model(nodes, [("x", F, [6])], [("y", F, [2, 3])], [const("w", np.zeros((2, 3), np.float32))])
    CleanupPass()(m)
    assert ops(m) == ["Reshape"]
    x = np.arange(6, dtype=np.float32)
    np.testing.assert_array_equal(run(m, {"x": x})[0], x.reshape(2, 3))
    assert I64  # int64 shape input stays a constant initializer
