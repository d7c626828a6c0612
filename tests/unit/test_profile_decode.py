"""tools/bench/profile_decode.py (issue 16): per-node medians, op-type and role sums, and a real
profile of the tiny Llama's decode graph (structure only: times on a shared CPU are not asserted)."""

import onnx
import pytest

from slmedge.tools.bench import bench_quant, profile_decode


def test_summarize_takes_node_medians_and_groups_layers_by_role():
    raw = {"run_us": [900, 100, 300], "graph_nodes": 4, "load": (1.0, 2.0, 3.0),
           "nodes": {"layers.0.mlp.MatMul": ["MatMulNBits", [10, 1000, 12]],
                     "layers.1.mlp.MatMul": ["MatMulNBits", [20, 22, 21]],
                     "layers.0.zp_fold/add": ["Add", [5, 5, 6]],
                     "lm_head": ["MatMulNBits", [50]]}}
    s = profile_decode.summarize(raw)
    assert s["model_run_median_us"] == 300
    assert s["op_types"]["MatMulNBits"] == {"nodes": 3, "us": 12 + 21 + 50,
                                            "share": round(83 / 88, 4)}
    assert s["op_types"]["Add"]["us"] == 5
    assert s["kernel_sum_us"] == 88
    assert s["roles"]["layers.#.mlp.MatMul"] == {"nodes": 2, "us": 33}
    assert list(s["roles"])[0] == "lm_head"  # sorted by time
    assert s["timed_nodes"] == 4 and s["load_average"] == [1.0, 2.0, 3.0]
    assert list(profile_decode.summarize(raw, top=2)["top_nodes"].items()) == [
        ("lm_head", 50), ("layers.1.mlp.MatMul", 21)]


def test_profile_of_the_tiny_llama_decode_graph(tiny_artifact):
    path = tiny_artifact("llama") / "model.onnx"
    graph = onnx.load(str(path), load_external_data=False).graph
    s = profile_decode.profile_once(path, past=8, steps=5, threads=1)
    assert s["graph_nodes"] == len(graph.node)
    # ORT may fuse or fold nodes, so the timed ones are the session's, not the file's
    assert 0 < s["timed_nodes"] <= len(graph.node)
    assert sum(v["nodes"] for v in s["op_types"].values()) == s["timed_nodes"]
    assert sum(v["nodes"] for v in s["roles"].values()) == s["timed_nodes"]
    assert s["kernel_sum_us"] == pytest.approx(sum(v["us"] for v in s["op_types"].values()),
                                               abs=0.1 * len(s["op_types"]))
    assert "MatMul" in s["op_types"] or "MatMulNBits" in s["op_types"]


def test_unknown_decoder_input_is_named(tmp_path):
    x = onnx.helper.make_tensor_value_info("pixel_values", onnx.TensorProto.FLOAT, [1, 3])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])
    g = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["pixel_values"], ["y"])],
                               "g", [x], [y])
    path = tmp_path / "m.onnx"
    onnx.save(onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)]), path)
    with pytest.raises(RuntimeError, match="'pixel_values' is not a decoder input"):
        profile_decode.profile_once(path, past=4, steps=1, threads=1)


def test_genai_asym_row_builds_with_is_symmetric_false(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(bench_quant, "WORK", tmp_path)

    def fake_run(cmd):
        calls.append(cmd)
        out = tmp_path / "genai-int4-asym"
        out.mkdir()
        (out / "genai_config.json").write_text('{"model": {"decoder": {}}}')

    monkeypatch.setattr(bench_quant, "run", fake_run)
    out = bench_quant.prepare_genai(tmp_path / "hf", "int4-asym", threads=2)
    assert out == tmp_path / "genai-int4-asym"
    (cmd,) = calls
    assert cmd[cmd.index("-p") + 1] == "int4"
    assert cmd[cmd.index("--extra_options") + 1:] == ["is_symmetric=false",
                                                         "shared_embeddings=false"]
    assert '"intra_op_num_threads": 2' in (out / "genai_config.json").read_text()
