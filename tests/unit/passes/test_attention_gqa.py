"""Pieces of the GroupQueryAttention fusion on small graphs (the whole fusion is tested on
the six tiny architectures in tests/parity/test_fusion.py)."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import helper
from pass_graphs import F, I64, const, model

from slmedge.exporter.passes.attention_gqa import (GroupQueryAttentionFusion, NoMatch, cos_sin_in_graph,
                                                    evaluate_cos_sin)
from slmedge.exporter.passes.pipeline import FusionOptions


def test_cos_sin_caches_are_the_graphs_own_tables_at_every_position():
    inv_freq = (1.0 / 10000 ** (np.arange(0, 8, 2) / 8)).astype(np.float32)
    nodes = [
        helper.make_node("Unsqueeze", ["position_ids", "ax"], ["p3"]),
        helper.make_node("Cast", ["p3"], ["pf"], to=F),
        helper.make_node("Mul", ["pf", "inv_freq"], ["freqs"]),
        helper.make_node("Concat", ["freqs", "freqs"], ["emb"], axis=-1),
        helper.make_node("Cos", ["emb"], ["cos"]),
        helper.make_node("Sin", ["emb"], ["sin"]),
    ]
    m = model(nodes, [("position_ids", I64, [1, "s"])], [("cos", F, None), ("sin", F, None)],
              [const("ax", np.array([-1], np.int64)), const("inv_freq", inv_freq)])
    values = {v.name: v for n in m.graph for v in n.outputs}
    cos, sin = evaluate_cos_sin(m, values["cos"], values["sin"], 32)
    angles = np.arange(32)[:, None] * inv_freq[None, :]
    assert cos.shape == sin.shape == (32, 4)
    np.testing.assert_allclose(cos, np.cos(angles), atol=1e-6)
    np.testing.assert_allclose(sin, np.sin(angles), atol=1e-6)


def test_cos_sin_caches_built_in_the_graph_equal_the_evaluated_tables_and_fold_at_load(tmp_path):
    # transformers' rotary: inv_freq[1, D/2, 1] @ positions[1, 1, S], cat, cos/sin x scaling
    inv_freq = (1.0 / 10000 ** (np.arange(0, 16, 2) / 16)).astype(np.float32)
    nodes = [
        helper.make_node("Unsqueeze", ["position_ids", "ax1"], ["p3"]),
        helper.make_node("Cast", ["p3"], ["pf"], to=F),
        helper.make_node("MatMul", ["inv_freq", "pf"], ["freqs_t"]),
        helper.make_node("Transpose", ["freqs_t"], ["freqs"], perm=[0, 2, 1]),
        helper.make_node("Concat", ["freqs", "freqs"], ["emb"], axis=-1),
        helper.make_node("Cos", ["emb"], ["cos_raw"]),
        helper.make_node("Sin", ["emb"], ["sin_raw"]),
        helper.make_node("Mul", ["cos_raw", "scaling"], ["cos"]),
        helper.make_node("Mul", ["sin_raw", "scaling"], ["sin"]),
    ]
    m = model(nodes, [("position_ids", I64, [1, "s"])], [("cos", F, None), ("sin", F, None)],
              [const("ax1", np.array([1], np.int64)), const("inv_freq", inv_freq[None, :, None]),
               const("scaling", np.array(1.25, np.float32))])
    values = {v.name: v for n in m.graph for v in n.outputs}
    length = 4096
    cos, sin = evaluate_cos_sin(m, values["cos"], values["sin"], length)
    cos_cache, sin_cache = cos_sin_in_graph(m.graph, values["cos"], values["sin"], length, 8, "gqa.rotary0")
    m.graph.outputs.clear()
    m.graph.outputs.extend([cos_cache, sin_cache])
    ir.passes.common.RemoveUnusedNodesPass()(m)
    m.graph.inputs.clear()
    proto = ir.to_proto(m)
    # cat(freqs, freqs) is left out of the copy: it computes only the half the caches keep
    assert [n.op_type for n in proto.graph.node].count("Cos") == 1
    assert "Concat" not in {n.op_type for n in proto.graph.node}
    # the file holds the small constants only, not the [4096, 8] tables
    assert sum(t.ByteSize() for t in proto.graph.initializer) < 1000  # tables: 262,144 bytes
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "folded.onnx")
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    c, s = sess.run(None, {})
    assert c.shape == s.shape == (length, 8)
    np.testing.assert_array_equal(c, cos)
    np.testing.assert_array_equal(s, sin)
    folded = onnx.load(str(tmp_path / "folded.onnx"))
    assert not {"Range", "Cos", "Sin", "MatMul"} & {n.op_type for n in folded.graph.node}


def test_cos_sin_that_need_other_inputs_are_refused():
    nodes = [helper.make_node("Cos", ["x"], ["cos"]), helper.make_node("Sin", ["x"], ["sin"])]
    m = model(nodes, [("x", F, [1, 4])], [("cos", F, [1, 4]), ("sin", F, [1, 4])])
    values = {v.name: v for n in m.graph for v in n.outputs}
    try:
        evaluate_cos_sin(m, values["cos"], values["sin"], 8)
    except NoMatch as e:
        assert "position_ids" in str(e)
    else:
        raise AssertionError("expected NoMatch")


def test_a_softmax_that_is_not_attention_fuses_nothing_and_says_why():
    m = model([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], [("x", F, [2, 3])], [("y", F, [2, 3])])
    fusion = GroupQueryAttentionFusion()
    fusion(m)
    assert fusion.count == 0
    assert "none fused" in fusion.reasons[0] and "MatMul" in fusion.reasons[1]
    assert [n.op_type for n in m.graph] == ["Softmax"]


def test_sliding_windows_come_from_the_hf_config():
    gemma = {"max_position_embeddings": 1024, "sliding_window": 8,
             "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}
    options = FusionOptions.from_hf_config(gemma)
    assert options.max_sequence_length == 1024
    assert options.sliding_windows == {0: 8, 2: 8}
    qwen = {"max_position_embeddings": 64, "sliding_window": 16, "use_sliding_window": False,
            "num_hidden_layers": 2}
    assert FusionOptions.from_hf_config(qwen).sliding_windows == {}
