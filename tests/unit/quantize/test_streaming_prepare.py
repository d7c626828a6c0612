"""The pieces of the streaming quantizer: external-data reads and writes (external_data.py)
and the graph preparation on placeholders (lazy_graph.py) against the in-memory functions."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from slmedge.exporter.quantize import graph as mem_graph
from slmedge.exporter.quantize import lazy_graph
from slmedge.exporter.quantize.external_data import DataFileWriter, TensorSource, tensor_nbytes
from slmedge.exporter.quantize.pack_matmuls import pack_shared_input_matmuls


def test_written_tensors_read_back_exactly_and_big_ones_start_on_a_page(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"a": rng.standard_normal((3, 5)).astype(np.float32),
              "b": rng.standard_normal((512, 1024)).astype(np.float16),  # 1 MiB: aligned
              "c": np.arange(7, dtype=np.int64)}
    with DataFileWriter(tmp_path / "w.data") as out:
        refs = {n: out.add_array(n, a) for n, a in arrays.items()}
        assert out.names == set(arrays)
    offsets = {n: int(next(e.value for e in r.external_data if e.key == "offset"))
               for n, r in refs.items()}
    assert offsets["a"] == 0 and offsets["b"] % 4096 == 0 and offsets["b"] > 0
    source = TensorSource(tmp_path)
    for name, a in arrays.items():
        got = source.read(refs[name])
        assert got.dtype == a.dtype and got.tobytes() == a.tobytes()
        assert tensor_nbytes(refs[name]) == a.nbytes
    # the same through onnx's own loader: the references are standard external data
    graph = helper.make_graph([], "g", [], [], list(refs.values()))
    model = helper.make_model(graph)
    onnx.save_model(model, str(tmp_path / "m.onnx"))
    loaded = onnx.load(str(tmp_path / "m.onnx"))
    for t in loaded.graph.initializer:
        assert numpy_helper.to_array(t).tobytes() == arrays[t.name].tobytes()


def test_a_truncated_data_file_is_an_error_naming_the_tensor(tmp_path):
    with DataFileWriter(tmp_path / "w.data") as out:
        ref = out.add_array("layer.weight", np.ones((64, 64), np.float32))
    with open(tmp_path / "w.data", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ValueError, match=r"layer.weight: .*w.data ends before the tensor's 16384 bytes"):
        TensorSource(tmp_path).read(ref)


def _structure(model):
    nodes = [(n.op_type, n.name, list(n.input), list(n.output),
              sorted((a.name, repr(helper.get_attribute_value(a))) for a in n.attribute))
             for n in model.graph.node]
    inits = [(t.name, t.data_type, list(t.dims)) for t in model.graph.initializer]
    return nodes, inits


@pytest.mark.parametrize("model_type, fuse", [("gpt2", False), ("gemma3_text", False),
                                             ("qwen2", True), ("llama", True)])
def test_preparation_on_placeholders_gives_the_in_memory_graph_and_values(model_type, fuse,
                                                                         tiny_artifact, tmp_path):
    """Gemm split (unfused GPT-2), tied lm_head transpose (unfused graphs), gate/up packing:
    the same nodes and initializer names/shapes as the in-memory functions, and each
    placeholder computes the in-memory value."""
    path = tiny_artifact(model_type, fuse=fuse) / "model.onnx"
    mem = onnx.load(str(path))
    counts = (mem_graph.split_gemms(mem), mem_graph.fold_weight_transposes(mem),
              len(pack_shared_input_matmuls(mem)))

    src = tmp_path / "model.onnx"
    onnx.save_model(onnx.load(str(path)), str(src), save_as_external_data=True,
                    location="model.onnx.data", size_threshold=1024)
    lazy_model = onnx.load(str(src), load_external_data=False)
    lazy = lazy_graph.LazyWeights(lazy_model, TensorSource(tmp_path))
    assert (lazy_graph.split_gemms(lazy_model, lazy),
            lazy_graph.fold_weight_transposes(lazy_model, lazy),
            len(lazy_graph.pack_shared_input_matmuls(lazy_model, lazy))) == counts
    if model_type == "gpt2":
        assert counts[0] > 0  # its Conv1D projections export as Gemm
    assert sum(counts) > 0
    assert _structure(lazy_model) == _structure(mem)
    values = {t.name: numpy_helper.to_array(t) for t in mem.graph.initializer}
    placeholders = [t.name for t in lazy_model.graph.initializer if lazy.is_placeholder(t.name)]
    assert bool(placeholders) == (model_type != "gpt2")  # GPT-2's Gemms read B as it is
    for name in placeholders:
        got = lazy.array(name)
        assert got.dtype == values[name].dtype and got.tobytes() == values[name].tobytes(), name
    # no placeholder holds data: the graph alone is small
    assert all(not t.raw_data for t in lazy_model.graph.initializer if t.name in placeholders)


def test_graph_without_weights_is_bytes_of_structure(tmp_path):
    """A TensorProto placeholder states type and shape only (no data fields set)."""
    w = lazy_graph.LazyWeights(onnx.ModelProto(), TensorSource(tmp_path))
    t = w.placeholder("x", [4, 8], TensorProto.FLOAT, lambda: np.zeros((4, 8), np.float32))
    assert tensor_nbytes(t) == 128 and not t.raw_data and not t.float_data
    assert w.array("x").shape == (4, 8)


def test_transposed_gemm_and_transposed_matmul_weights_are_computed_when_read(tmp_path):
    """``Gemm(transB=1)`` and ``MatMul(x, Transpose(W))`` (a tied head): their ``W.T`` are
    placeholders computing the in-memory functions' arrays."""
    rng = np.random.default_rng(0)
    w_gemm = rng.standard_normal((48, 32)).astype(np.float32)  # [N, K], transB
    table = rng.standard_normal((40, 48)).astype(np.float32)  # [V, K'] read transposed
    nodes = [helper.make_node("Gemm", ["x", "w_gemm", "bias"], ["h"], name="fc", transB=1),
             helper.make_node("Transpose", ["table"], ["table_t"], name="t", perm=[1, 0]),
             helper.make_node("MatMul", ["h", "table_t"], ["logits"], name="head")]
    inits = [numpy_helper.from_array(w_gemm, "w_gemm"), numpy_helper.from_array(table, "table"),
             numpy_helper.from_array(np.zeros(48, np.float32), "bias")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 40])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save_model(model, str(tmp_path / "m.onnx"), save_as_external_data=True,
                    location="m.onnx.data", size_threshold=0)
    mem = onnx.load(str(tmp_path / "m.onnx"))
    assert (mem_graph.split_gemms(mem), mem_graph.fold_weight_transposes(mem)) == (1, 1)
    lazy_model = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    lazy = lazy_graph.LazyWeights(lazy_model, TensorSource(tmp_path))
    assert (lazy_graph.split_gemms(lazy_model, lazy),
            lazy_graph.fold_weight_transposes(lazy_model, lazy)) == (1, 1)
    assert _structure(lazy_model) == _structure(mem)
    values = {t.name: numpy_helper.to_array(t) for t in mem.graph.initializer}
    for name in ("w_gemm_T", "table_T"):
        assert lazy.is_placeholder(name)
        assert lazy.array(name).tobytes() == values[name].tobytes()


@pytest.mark.parametrize("model_type", ["gemma3_text", "gpt2"])
def test_a_single_file_graph_is_read_without_its_weights(model_type, tiny_artifact, tmp_path):
    """load_graph: the structure onnx.load gives, large inline weights as references into
    the .onnx file itself (read back exactly), small ones inline; external ones unchanged."""
    from slmedge.exporter.quantize.external_data import load_graph

    path = tiny_artifact(model_type) / "model.onnx"
    full = onnx.load(str(path))
    light = load_graph(path)
    source = TensorSource(path.parent)
    refs = [t for t in light.graph.initializer if t.external_data]
    assert refs and all(next(e.value for e in t.external_data if e.key == "location") == "model.onnx"
                        for t in refs)
    assert all(not t.raw_data for t in refs)
    assert [t.name for t in light.graph.initializer] == [t.name for t in full.graph.initializer]
    for a, b in zip(light.graph.initializer, full.graph.initializer, strict=True):
        assert source.read(a).tobytes() == numpy_helper.to_array(b).tobytes(), a.name
        assert (not a.external_data) == (tensor_nbytes(b) < 1024)

    def bare(model):
        for t in model.graph.initializer:
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT
            t.ClearField("raw_data")
        return model.SerializeToString(deterministic=True)

    assert bare(light) == bare(full)
    # a graph with external data already: its references are kept as they are
    onnx.save_model(full, str(tmp_path / "m.onnx"), save_as_external_data=True,
                    location="m.onnx.data", size_threshold=0)
    ext = load_graph(tmp_path / "m.onnx")
    assert [list(t.external_data) for t in ext.graph.initializer] == [
        list(t.external_data) for t in onnx.load(str(tmp_path / "m.onnx"),
                                                  load_external_data=False).graph.initializer]
