"""Small inline graphs for the pass tests: build with onnx.helper, run with ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

F = TensorProto.FLOAT
I64 = TensorProto.INT64


def const(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def model(nodes, inputs, outputs, inits=(), opset=18) -> ir.Model:
    """An ``ir.Model`` of one graph. inputs/outputs: (name, elem_type, shape) triples."""
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
        list(inits),
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto))


def run(m: ir.Model, feeds: dict) -> list[np.ndarray]:
    proto = ir.to_proto(m)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def ops(m: ir.Model) -> list[str]:
    return [n.op_type for n in m.graph]
