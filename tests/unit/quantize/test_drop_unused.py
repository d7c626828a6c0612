"""graph.drop_unused_initializers: the one unread-initializer drop of the quantizers."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from slmedge.exporter.quantize.graph import drop_unused_initializers


def test_an_initializer_read_only_inside_a_loop_body_is_kept():
    """A Loop body reading an outer initializer (the fp16 head's vocabulary chunks read the
    table so) keeps it; an initializer nothing reads goes, one that is a graph output stays."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["x", "inner_read"], ["y"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    inits = [numpy_helper.from_array(np.ones(2, np.float32), n)
             for n in ("inner_read", "unread", "as_output")]
    inits += [numpy_helper.from_array(np.array(2, np.int64), "trips"),
              numpy_helper.from_array(np.array(True), "cond")]
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "cond"], ["ys"], body=body)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("ys", TensorProto.FLOAT, [2, 2]),
         helper.make_tensor_value_info("as_output", TensorProto.FLOAT, [2])], inits)
    model = helper.make_model(graph)
    drop_unused_initializers(model)
    assert sorted(t.name for t in model.graph.initializer) == [
        "as_output", "cond", "inner_read", "trips"]
