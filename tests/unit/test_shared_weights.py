"""runtimes.sessions.shared_weights: the protobuf reader of external-data entries, against onnx."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from slmedge.runtimes.sessions.shared_weights import SharedWeights, external_tensors


def _model(tmp_path, name="m.onnx", location="w.data"):
    """A graph with external tensors of several dtypes, one inline tensor and one bfloat16."""
    rng = np.random.default_rng(0)
    # onnx writes them back to back, unpadded: this order keeps each at a multiple of its size
    arrays = {
        "w_i64": np.arange(6, dtype=np.int64).reshape(1, 2, 3),
        "w_f32": rng.standard_normal((4, 8)).astype(np.float32),
        "w_u16": rng.integers(0, 65535, (300,), dtype=np.uint16),
        "w_f16": rng.standard_normal((8, 3)).astype(np.float16),
        "w_i8": rng.integers(-128, 127, (5, 7), dtype=np.int8),
        "w_scalar": np.array(1.5, np.float32),
    }
    inits = [numpy_helper.from_array(a, n) for n, a in arrays.items()]
    inits.append(helper.make_tensor("w_bf16", TensorProto.BFLOAT16, [40], bytes(80), raw=True))
    nodes = [helper.make_node("Identity", [n], [f"out_{n}"]) for n in [*arrays, "w_bf16"]]
    outputs = [helper.make_tensor_value_info(f"out_{n}", t.data_type, list(t.dims))
               for n, t in zip([*arrays, "w_bf16"], inits, strict=True)]
    graph = helper.make_graph(nodes, "g", [], outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path / name
    # w_scalar (4 bytes) stays inline: under the size threshold (of sys.getsizeof(raw bytes))
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=64)
    return path, arrays


def test_reader_matches_onnx_entries(tmp_path):
    path, _ = _model(tmp_path)
    got = {t.name: t for t in external_tensors(path)}
    ref = onnx.load(str(path), load_external_data=False)
    expected = {}
    for t in ref.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            e = {x.key: x.value for x in t.external_data}
            expected[t.name] = (t.data_type, tuple(t.dims), e["location"], int(e.get("offset", 0)),
                                int(e["length"]))
    assert set(got) == set(expected) and "w_scalar" not in got and len(got) == 6
    for name, (dtype, dims, location, offset, length) in expected.items():
        t = got[name]
        assert (t.data_type, t.shape, t.location, t.offset, t.length) == \
            (dtype, dims, location, offset, length), name


def test_mapped_tensors_hold_the_files_values(tmp_path):
    path, arrays = _model(tmp_path)
    shared = SharedWeights([path])
    names = shared.names[path]
    assert set(names) == {"w_f32", "w_f16", "w_i8", "w_u16", "w_i64"}
    assert shared.skipped == [("w_bf16", "ONNX data type 16")]  # numpy has no bfloat16
    for name in names:
        np.testing.assert_array_equal(shared.array(path, name), arrays[name])
        assert shared.array(path, name).dtype == arrays[name].dtype
    assert shared.nbytes == sum(arrays[n].nbytes for n in names)
    assert not shared.array(path, "w_f32").flags.writeable  # ORT gets a read-only mapping


def test_entries_that_do_not_fit_are_left_to_onnxruntime(tmp_path):
    path, _ = _model(tmp_path)
    model = onnx.load(str(path), load_external_data=False)
    entry = {t.name: t for t in model.graph.initializer}
    for x in entry["w_f32"].external_data:  # shift off its 4-byte alignment
        if x.key == "offset":
            x.value = str(int(x.value) + 2)
    for x in entry["w_i8"].external_data:
        if x.key == "length":
            x.value = "3"
    for x in entry["w_u16"].external_data:
        if x.key == "location":
            x.value = "../elsewhere.data"
    onnx.save_model(model, str(path))
    shared = SharedWeights([path])
    why = dict(shared.skipped)
    assert "not aligned" in why["w_f32"] and "length 3" in why["w_i8"]
    assert "not a file next to" in why["w_u16"]
    assert set(shared.names[path]) == {"w_f16", "w_i64"}


def test_two_graphs_over_one_file_map_each_tensor_once(tmp_path):
    a, _ = _model(tmp_path, "a.onnx")
    b = tmp_path / "b.onnx"
    shutil.copy(a, b)  # a second graph over the same weights file (as prefill / decode)
    shared = SharedWeights([a, b])
    assert shared.tensors == 5 and len(shared.names[a]) == len(shared.names[b]) == 5
    assert shared.array(a, "w_f16") is shared.array(b, "w_f16")


def test_not_an_onnx_file_is_a_value_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x0f\xff\xff")
    with pytest.raises(ValueError):
        external_tensors(bad)

