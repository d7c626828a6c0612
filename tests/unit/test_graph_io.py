"""One reader of a graph's inputs and outputs (issue 13: manifest.py and bundle/build.py each had a
``graph_io`` returning a different shape): the bundle's static snippets take the signature,
the manifest's ``io`` its names."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from slmedge.exporter.manifest import graph_io, graph_signature


def _graph(path):
    w = numpy_helper.from_array(np.ones((3, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["w", "ids"], ["rows"]),
         helper.make_node("MatMul", ["rows", "w"], ["logits"]),
         helper.make_node("Shape", ["mask"], ["mask_shape"])],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 4]),
         helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", "total"]),
         # an initializer listed as an input too (old exporters do this): not an input to feed
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [3, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4, 3]),
         helper.make_tensor_value_info("mask_shape", TensorProto.INT64, [2])],
        [w],
    )
    onnx.save(helper.make_model(graph), str(path))


def test_signature_names_dtypes_and_shapes_without_initializers(tmp_path):
    _graph(tmp_path / "m.onnx")
    assert graph_signature(tmp_path / "m.onnx") == {
        "inputs": [{"name": "ids", "dtype": "int64", "shape": ["batch", 4]},
                   {"name": "mask", "dtype": "int64", "shape": ["batch", "total"]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 4, 3]},
                    {"name": "mask_shape", "dtype": "int64", "shape": [2]}],
    }


def test_manifest_io_is_the_signatures_names(tmp_path):
    _graph(tmp_path / "m.onnx")
    assert graph_io(tmp_path / "m.onnx") == {"inputs": ["ids", "mask"],
                                             "outputs": ["logits", "mask_shape"]}
