"""The split lm_head: frequent-token rows at int8, the other rows at int4 (head_split.py)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from pydantic import ValidationError

from slmedge.exporter.quantize.core import quantize_model
from slmedge.exporter.quantize.head_split import frequent_tokens, split_lm_head
from slmedge.exporter.quantize.recipe import QuantRecipe
from slmedge.runtimes.sessions.onnx_decoder import OnnxDecoder

IDS = list(range(6, 40))


def _head_graph(k=16, vocab=40, seed=0):
    w = np.random.default_rng(seed).standard_normal((k, vocab)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["h", "W"], ["logits"], name="lm_head")], "g",
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["b", "s", k])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", vocab])],
        [numpy_helper.from_array(w, "W")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, h):
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"h": h})[0]


def test_split_keeps_every_logit_at_its_vocabulary_index():
    model = _head_graph()
    h = np.random.default_rng(1).standard_normal((1, 3, 16)).astype(np.float32)
    want = _run(model, h)
    hi, lo = split_lm_head(model, "lm_head", [7, 0, 39, 12])
    ops = [n.op_type for n in model.graph.node]
    assert ops == ["MatMul", "MatMul", "Concat", "Gather"] and model.graph.node[-1].output[0] == "logits"
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    assert "W" not in shapes  # the original weight is gone, its columns live in the two parts
    by_name = {n.name: n for n in model.graph.node}
    assert shapes[by_name[hi].input[1]] == [16, 4] and shapes[by_name[lo].input[1]] == [16, 36]
    np.testing.assert_array_equal(_run(model, h), want)  # a permutation: bit-exact


def test_split_in_groups_of_ids_reorders_whole_groups():
    model = _head_graph(vocab=256)
    h = np.random.default_rng(1).standard_normal((2, 3, 16)).astype(np.float32)
    want = _run(model, h)
    tokens = [*range(128, 192), *range(0, 64)]  # two aligned groups of 64, in rank order
    split_lm_head(model, "lm_head", tokens, group=64)
    ops = [n.op_type for n in model.graph.node]
    assert ops == ["MatMul", "MatMul", "Concat", "Reshape", "Gather", "Shape", "Reshape"]
    order = next(numpy_helper.to_array(t) for t in model.graph.initializer if "vocab_order" in t.name)
    assert order.tolist() == [1, 2, 0, 3]  # groups 0..3 read from concat groups 1, 2, 0, 3
    np.testing.assert_array_equal(_run(model, h), want)
    with pytest.raises(ValueError, match="whole aligned groups of 64"):
        split_lm_head(_head_graph(vocab=256), "lm_head", list(range(1, 65)), group=64)


@pytest.mark.parametrize("tokens,why", [([], "1..39"), (list(range(40)), "1..39"),
                                         ([3, 3], "distinct"), ([40], "below 40")])
def test_split_refuses_bad_token_lists(tokens, why):
    with pytest.raises(ValueError, match=why):
        split_lm_head(_head_graph(), "lm_head", tokens)


def test_frequent_tokens_ranks_by_count_then_id_and_drops_out_of_vocabulary():
    ids = [5, 3, 5, 9, 3, 5, 1, 99, 99, 99, 99]
    assert frequent_tokens(ids, 3, vocab=50) == [5, 3, 1]
    assert frequent_tokens(ids, 10, vocab=50) == [5, 3, 1, 9]
    # in groups of 4 ids: group 1 (ids 4..7) has 3 hits, group 0 has 3 (tie: lower first)...
    assert frequent_tokens(ids, 8, vocab=52, group=4) == [0, 1, 2, 3, 4, 5, 6, 7]
    assert frequent_tokens(ids, 7, vocab=52, group=4) == [0, 1, 2, 3]  # whole groups only


def test_recipe_needs_an_int4_lm_head_to_split():
    with pytest.raises(ValidationError, match="needs lm_head int4"):
        QuantRecipe(scheme="int4", lm_head_int8_tokens=100)
    with pytest.raises(ValidationError, match="needs lm_head int4"):
        QuantRecipe(scheme="int8", lm_head="int8", lm_head_int8_tokens=100)
    r = QuantRecipe(scheme="int4", lm_head="int4", lm_head_int8_tokens=100)
    assert r.label().endswith("head4x8top100")


def test_quantized_split_head_on_a_tiny_model(tiny_artifact, tmp_path):
    """Calibration tokens pick the int8 rows. The other rows are quantized exactly as in an
    all-int4 symmetric RTN lm_head (same logits); the int8 rows are much closer to a float
    lm_head than there. The reference has the same (int8) decoder layers and a float lm_head,
    so the difference measured is the lm_head's own."""
    import json

    art = tiny_artifact("llama")
    layers = json.loads((art / "manifest.json").read_text())["architecture"]["num_layers"]
    calib = [int(t) for t in np.random.default_rng(2).integers(0, 24, 400)]  # tokens 0..23
    common = dict(scheme="int4", algorithm="rtn", symmetric=True, lm_head="int4",
                  keep_layers=list(range(layers)))
    split_out, all4_out = tmp_path / "split.onnx", tmp_path / "all4.onnx"
    report = quantize_model(art / "model.onnx", split_out,
                            QuantRecipe(**common, lm_head_int8_tokens=16), calibration_ids=calib)
    quantize_model(art / "model.onnx", all4_out, QuantRecipe(**common), calibration_ids=calib)
    ref_out = tmp_path / "head-float.onnx"
    quantize_model(art / "model.onnx", ref_out, QuantRecipe(**{**common, "lm_head": "float"}),
                   calibration_ids=calib)
    assert report.lm_head == "int4+int8" and report.calibration["lm_head_int8_rows"] == 16
    graph = onnx.load(str(split_out), load_external_data=False).graph
    gather = next(n for n in graph.node if n.op_type == "Gather" and n.output[0] == "logits")
    concat = next(n for n in graph.node if n.output[0] == gather.input[0])
    heads = [n for n in graph.node if n.op_type == "MatMulNBits" and n.output[0] in concat.input]
    attrs = sorted((next(a.i for a in n.attribute if a.name == "bits"),
                    next(a.i for a in n.attribute if a.name == "N")) for n in heads)
    assert attrs[0][0] == 4 and attrs[1] == (8, 16)
    ref = OnnxDecoder(ref_out).logits(IDS)
    split = OnnxDecoder(split_out).logits(IDS)
    all4 = OnnxDecoder(all4_out).logits(IDS)
    hi = frequent_tokens(calib, 16, ref.shape[-1])
    lo = sorted(set(range(ref.shape[-1])) - set(hi))
    np.testing.assert_allclose(split[:, lo], all4[:, lo], atol=1e-5, rtol=0)
    err_split, err_all4 = np.abs(split - ref)[:, hi].mean(), np.abs(all4 - ref)[:, hi].mean()
    assert err_split < 0.2 * err_all4, (err_split, err_all4)


def _facts(vocab: int):
    from slmedge.exporter.quantize.graph import GraphFacts, WeightMatMul

    body = [WeightMatMul(f"l{i}", f"w{i}", 576, 1536, i, "") for i in range(2)]
    head = WeightMatMul("head", "wh", 576, vocab, None, "lm_head")
    return GraphFacts(weight_matmuls=[*body, head], lm_head="head", num_layers=2)


def test_auto_tries_a_split_lm_head_between_int4_and_int8_heads():
    from slmedge.exporter.quantize.auto import SPLIT_HEAD_ROWS, candidates

    base = QuantRecipe(scheme="int4")
    tried = candidates(base, _facts(49152))
    labels = [r.label() for r, _ in tried if r.block_size == 32 and not r.keep_layers]
    sizes = {r.label(): mb for r, mb in tried}
    split = f"int4-hqq-b32-asym-head4x8top{SPLIT_HEAD_ROWS}"
    assert labels.index("int4-hqq-b32-asym-head4") < labels.index(split) < labels.index(
        "int4-hqq-b32-asym-head8")
    assert sizes["int4-hqq-b32-asym-head4"] < sizes[split] < sizes["int4-hqq-b32-asym-head8"]
    # a vocabulary too small to split gets no such candidate; a user recipe that already
    # splits still yields valid int8 / float lm_head candidates
    assert not any(r.lm_head_int8_tokens for r, _ in candidates(base, _facts(8000)))
    user = QuantRecipe(scheme="int4", lm_head="int4", lm_head_int8_tokens=1024)
    heads = {(r.lm_head.value, r.lm_head_int8_tokens) for r, _ in candidates(user, _facts(49152))}
    assert ("int8", 0) in heads and ("float", 0) in heads


def test_split_head_int4_rows_have_no_zero_point_correction(tiny_artifact, tmp_path):
    """With an HQQ body (float zero points, folded into correction MatMuls) the split
    lm_head's int4 rows are symmetric RTN: no zero points, so no correction MatMul over the
    vocabulary, while the body's projections keep theirs."""
    art = tiny_artifact("llama")
    calib = [int(t) for t in np.random.default_rng(3).integers(0, 24, 400)]
    out = tmp_path / "split-hqq.onnx"
    quantize_model(art / "model.onnx", out, QuantRecipe(scheme="int4", lm_head="int4",
                                                        lm_head_int8_tokens=16),
                   calibration_ids=calib)
    graph = onnx.load(str(out), load_external_data=False).graph
    gather = next(n for n in graph.node if n.op_type == "Gather" and n.output[0] == "logits")
    concat = next(n for n in graph.node if n.output[0] == gather.input[0])
    heads = {n.output[0]: n for n in graph.node if n.op_type == "MatMulNBits"
             and n.output[0] in concat.input}
    assert len(heads) == 2  # int8 rows, int4 rows: both straight into the Concat
    bits = {next(a.i for a in n.attribute if a.name == "bits"): n for n in heads.values()}
    assert len(bits[4].input) == 3  # the int4 rows: no zero points at all
    inits = {t.name: t for t in graph.initializer}  # the int8 rows: integer ones, if any
    assert all(inits[n.input[3]].data_type == onnx.TensorProto.UINT8
               for n in heads.values() if len(n.input) > 3)
    folded = [n for n in graph.node if n.op_type == "Add" and "zp_fold" in n.name]
    assert folded and not any(n.output[0] in concat.input for n in folded)


@pytest.mark.parametrize("algorithm", ["k_quant", "rtn"])
def test_an_unread_graph_input_survives_every_int4_algorithm(tiny_artifact, tmp_path, algorithm):
    """Fused graphs keep position_ids as an input that GroupQueryAttention no longer reads;
    ORT's k_quant path failed on it (KeyError in its topological sort). It stays an input,
    at its place."""
    art = tiny_artifact("llama")
    before = [i.name for i in onnx.load(str(art / "model.onnx"), load_external_data=False).graph.input]
    out = tmp_path / "q.onnx"
    quantize_model(art / "model.onnx", out, QuantRecipe(scheme="int4", algorithm=algorithm))
    graph = onnx.load(str(out), load_external_data=False).graph
    assert [i.name for i in graph.input] == before and "position_ids" in before
    assert not any("position_ids" in n.input for n in graph.node)
