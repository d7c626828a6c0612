"""save_graph computes the next lazy weight while it writes one: same files, each weight read
once, errors still raised, the graph left as it was."""

from __future__ import annotations

import threading

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from slmedge.exporter.onnx import graph_writer
from slmedge.exporter.onnx.graph_writer import save_graph
from slmedge.exporter.onnx.lazy_weights import WeightTensor


def _model(calls: list, fail: str | None = None) -> ir.Model:
    """Add(x, w0) -> Add(., w1) ... with lazy [64, 64] weights that record their reads."""
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((64, 64)).astype(np.float32) for _ in range(5)]
    x = ir.Value(name="x", shape=ir.Shape([64, 64]), type=ir.TensorType(ir.DataType.FLOAT))
    nodes, values, prev = [], [], x
    for i, a in enumerate(arrays):
        name = f"model.layers.{i}.w"

        def load(a=a, name=name):
            calls.append((name, threading.current_thread().name))
            if name == fail:
                raise OSError(f"cannot read {name}")
            return ir.Tensor(a, name=name)

        w = ir.Value(name=name, shape=ir.Shape([64, 64]), type=ir.TensorType(ir.DataType.FLOAT),
                     const_value=WeightTensor(load, ir.DataType.FLOAT, ir.Shape([64, 64]),
                                              name=name, layer=i))
        values.append(w)
        node = ir.node("Add", [prev, w])
        nodes.append(node)
        prev = node.outputs[0]
    prev.name, prev.shape, prev.type = "y", ir.Shape([64, 64]), ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([x], [prev], nodes=nodes, initializers=values, opset_imports={"": 18})
    return ir.Model(graph, ir_version=9)


@pytest.mark.parametrize("external", [True, False])
def test_prefetched_write_is_the_serial_write(tmp_path, monkeypatch, external):
    files = {}
    for limit in (0, graph_writer.PREFETCH_MAX_BYTES):  # 0: nothing computed ahead
        monkeypatch.setattr(graph_writer, "PREFETCH_MAX_BYTES", limit)
        calls: list = []
        model = _model(calls)
        lazies = [v.const_value for v in model.graph.initializers.values()]
        out = tmp_path / str(limit)
        out.mkdir()
        save_graph(model, out / "model.onnx", external_data=external)
        files[limit] = [(out / f).read_bytes() for f in ("model.onnx", "model.onnx.data")
                        if (out / f).exists()]
        # each weight read once, in the worker thread when computed ahead
        assert sorted(n for n, _ in calls) == [f"model.layers.{i}.w" for i in range(5)]
        ahead = [t for _, t in calls if t.startswith("slmedge-prefetch")]
        assert (len(ahead) >= 3) if limit else not ahead
        # the graph holds its own lazy weights again
        assert [v.const_value for v in model.graph.initializers.values()] == lazies
    assert files[0] == files[graph_writer.PREFETCH_MAX_BYTES]
    loaded = onnx.load(str(tmp_path / "0" / "model.onnx"))
    assert len(loaded.graph.initializer) == 5


def test_a_weight_that_fails_to_read_fails_the_write(tmp_path):
    model = _model([], fail="model.layers.3.w")
    with pytest.raises(OSError, match="cannot read model.layers.3.w"):
        save_graph(model, tmp_path / "model.onnx", external_data=True)
    assert all(isinstance(v.const_value, WeightTensor) for v in model.graph.initializers.values())
