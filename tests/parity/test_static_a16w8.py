"""a16w8 QDQ of static graphs when the residual stream carries massive activations.

SmolLM2-135M's residual stream reaches |x| 23,594 in a few channels at a few positions; one
16-bit scale over that range has a step of ~0.7, and every ordinary value rounds away. The
tiny Llama here gets the same thing injected (one embedding entry of one token set to
``MASSIVE``), so the decisions of the recipe can be checked in seconds: the residual stream
and the rotary angle stay float, the decisions are recorded, and prefill and decode share
their ranges."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from helpers.static_fixtures import static_artifact_path

from slmedge.runtimes.sessions.static_decoder import StaticDecoder

MASSIVE = 20_000.0
TOKEN, CHANNEL = 9, 5
FLOAT_OPS = ["Softmax", "ReduceMean", "Pow", "Sqrt"]  # android-qnn-htp's


@pytest.fixture(scope="module")
def massive_llama(tmp_path_factory):
    """A float static artifact (context 32, chunk 8) of a tiny Llama whose token ``TOKEN``
    puts ``MASSIVE`` into channel ``CHANNEL`` of the residual stream."""
    import torch
    from helpers.tiny_models import EOS, tiny_model, tiny_tokenizer

    hf = tmp_path_factory.mktemp("hf-llama-massive")
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[TOKEN, CHANNEL] = MASSIVE
    model.generation_config.eos_token_id = EOS
    model.save_pretrained(hf)
    tiny_tokenizer().save_pretrained(hf)
    return static_artifact_path(tmp_path_factory, lambda _t: hf, "llama-massive")


def _ids(seed, n):
    ids = np.random.default_rng(seed).integers(6, 128, n)
    ids[::7] = TOKEN  # the massive token every 7 positions
    return ids.tolist()


def _cosine(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def _dq_fed(model: onnx.ModelProto) -> set[str]:
    """Names of the nodes that read a DequantizeLinear output."""
    producer = {o: n for n in model.graph.node for o in n.output}
    return {n.name for n in model.graph.node
            if any(i in producer and producer[i].op_type == "DequantizeLinear" for i in n.input)}


def test_residual_stream_and_rotary_angle_stay_float_and_are_recorded(massive_llama, tmp_path):
    from slmedge.exporter.quantize.recipe import QuantRecipe
    from slmedge.exporter.onnx.static_shapes_qdq import quantize_static_graphs, static_quality

    work = tmp_path / "q"
    shutil.copytree(massive_llama, work)
    static = json.loads((work / "manifest.json").read_text())["static"]
    ids = _ids(4, 400)
    report = quantize_static_graphs(work, static, QuantRecipe(scheme="a16w8"), ids,
                                    float_ops=FLOAT_OPS)
    layers = 2
    for kind in ("prefill", "decode"):
        kept = report["kept_float"][kind]
        stream = kept["residual stream"]
        # 2 residual Adds per layer + each norm's eps Add; every norm (2 per layer + final)
        # reads the stream with Pow and x * rsqrt
        assert stream["nodes"]["Add"] == 2 * layers + (2 * layers + 1)
        assert stream["nodes"]["Pow"] == stream["nodes"]["Reciprocal"] == 2 * layers + 1
        assert stream["nodes"]["Mul"] == 2 * layers + 1
        assert stream["nodes"]["Gather"] == 1  # the embedding lookup writes the stream
        assert "massive activations" in stream["reason"]
        assert stream["calibrated_max_abs"] >= 0.9 * MASSIVE
        assert {"Cos", "Sin"} <= set(kept["rotary position path"]["nodes"])
        table = report["tables"][kind]
        assert any("residual stream" in r for r in table["Add"]["reasons"])
        assert table["MatMul"]["quantized"] > 0
    assert "shared by the prefill and decode graphs" in report["ranges"]
    # every chunk offset of the 32-token window (0/8/16/24), decode caches of 1 .. 30 slots
    assert report["calibration_samples"] == {"prefill": 4, "decode": 8}

    graphs = {k: onnx.load(str(work / f"{k}.onnx"), load_external_data=False)
              for k in ("prefill", "decode")}
    for model in graphs.values():
        fed = _dq_fed(model)
        float_ops = {n.op_type for n in model.graph.node
                     if n.name not in fed and n.op_type in ("Cos", "Sin", "Pow")}
        assert float_ops == {"Cos", "Sin", "Pow"}
        residual_adds = [n for n in model.graph.node if n.op_type == "Add" and n.name not in fed]
        assert len(residual_adds) >= 2 * layers
    # One encoding per tensor in both graphs (the decode graph's few calibration tokens alone
    # would clip): every activation scale the two graphs share is the same number.
    scales = {k: {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer
                  if i.name.endswith("_scale") and i.dims == []}
              for k, m in graphs.items()}
    common = set(scales["prefill"]) & set(scales["decode"])
    assert len(common) > 50
    assert all(np.array_equal(scales["prefill"][n], scales["decode"][n]) for n in common)

    card = static_quality(StaticDecoder(massive_llama, static), StaticDecoder(work, static),
                          _ids(5, 200), window=32, prompts=2, prompt_tokens=8, new_tokens=8)
    assert card.cosine_mean > 0.99, card


def test_quantizing_the_residual_stream_loses_the_ordinary_values(massive_llama, tmp_path):
    """The same prefill graph and calibration, with and without the residual-stream decision:
    quantized, the 16-bit step of the stream (~2 * MASSIVE / 65535) drowns the other
    positions; kept float, the logits stay close to the float graph's."""
    from slmedge.exporter.quantize.graph import analyze
    from slmedge.exporter.quantize.recipe import QuantRecipe
    from slmedge.exporter.quantize.qdq import quantize_static_qdq
    from slmedge.exporter.onnx.static_shapes_qdq import FeedReader, _bias_path, _kept_float, record_feeds

    static = json.loads((massive_llama / "manifest.json").read_text())["static"]
    feeds = record_feeds(massive_llama, static, _ids(4, 400))
    model = onnx.load(str(massive_llama / "prefill.onnx"), load_external_data=False)
    facts = analyze(model)
    new, _ = _kept_float(model, facts, FLOAT_OPS)
    old = {n: "bias path or float_ops" for n in _bias_path(model.graph)}
    old |= {n.name: "float_ops" for n in model.graph.node if n.op_type in FLOAT_OPS}
    assert set(old) < set(new)

    probe = _ids(6, 24)
    ref = StaticDecoder(massive_llama, static).logits(probe)
    ordinary = np.array(probe) != TOKEN
    results = {}
    for name, keep in (("old", old), ("new", new)):
        root = tmp_path / name
        shutil.copytree(massive_llama, root)
        quantize_static_qdq(massive_llama / "prefill.onnx", root / "prefill.onnx", facts,
                            QuantRecipe(scheme="a16w8"), FeedReader(feeds["prefill"]),
                            keep_float=keep)
        got = StaticDecoder(root, static).logits(probe)  # 3 prefill chunks
        results[name] = _cosine(ref, got)[ordinary]
    print({k: np.round(v, 3).tolist() for k, v in results.items()})
    assert results["new"].mean() > 0.99 and results["new"].min() > 0.9, results["new"]
    assert results["old"].mean() < 0.8, results["old"]


def test_a_tied_embedding_lookup_reads_the_quantized_table():
    """The lookup of a table the lm_head also reads (tied) is not kept float: a float lookup
    would need the whole table dequantized (SmolLM2-135M's prefill then failed to finalize on
    the HTP emulator, QNN_COMMON_ERROR_MEM_ALLOC). An untied lookup writes the stream float."""
    from onnx import TensorProto, helper

    from slmedge.exporter.onnx.static_shapes_qdq import residual_stream

    def graph(tied: bool):
        table = helper.make_tensor("table", TensorProto.FLOAT, [16, 4], [0.1] * 64)
        head = helper.make_tensor("head", TensorProto.FLOAT, [16, 4], [0.2] * 64)
        nodes = [
            helper.make_node("Gather", ["table", "ids"], ["emb"], name="lookup"),
            helper.make_node("MatMul", ["emb", "w"], ["branch"], name="proj"),
            helper.make_node("Add", ["emb", "branch"], ["h"], name="residual"),
            helper.make_node("Pow", ["h", "two"], ["sq"], name="pow"),
            helper.make_node("Transpose", ["table" if tied else "head"], ["head_t"],
                             name="head_t", perm=[1, 0]),
            helper.make_node("MatMul", ["h", "head_t"], ["logits"], name="lm_head"),
        ]
        inits = [table, head, helper.make_tensor("w", TensorProto.FLOAT, [4, 4], [0.0] * 16),
                 helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])]
        return helper.make_graph(
            nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 3])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3, 16])], inits)

    untied, tensors = residual_stream(graph(False), ["lookup"])
    assert {"lookup", "residual", "pow", "lm_head"} <= untied and tensors == {"emb", "h"}
    tied, tensors = residual_stream(graph(True), ["lookup"])
    assert "lookup" not in tied and {"residual", "pow"} <= tied and tensors == {"emb", "h"}


def test_the_label_says_how_the_graph_holds_the_lm_head():
    """A tied lm_head reads Transpose(table) and gets quantized with the activations (16-bit
    under a16w8) although the recipe keeps lm_heads float: the label and the manifest's
    lm_head entry say what the QDQ graph holds, read from the graph itself."""
    from onnx import TensorProto, helper, numpy_helper

    from slmedge.exporter.quantize.recipe import QuantRecipe
    from slmedge.exporter.onnx.static_shapes_qdq import label_as_built, lm_head_precision

    def graph(zp_type):
        nodes = [helper.make_node("MatMul", ["h", "w"], ["logits"])]
        inits = []
        if zp_type is not None:
            nodes.insert(0, helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["w"]))
            inits = [numpy_helper.from_array(np.zeros((4, 8), np.uint16 if zp_type ==
                                                      TensorProto.UINT16 else np.uint8), "wq"),
                     numpy_helper.from_array(np.array(0.1, np.float32), "s"),
                     helper.make_tensor("z", zp_type, [], [0])]
        else:
            inits = [numpy_helper.from_array(np.zeros((4, 8), np.float32), "w")]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("h", 1, [1, 4])],
                              [helper.make_tensor_value_info("logits", 1, [1, 8])], inits)
        return helper.make_model(g)

    assert lm_head_precision(graph(TensorProto.UINT16)) == "int16"
    assert lm_head_precision(graph(TensorProto.UINT8)) == "int8"
    assert lm_head_precision(graph(None)) == "float"
    recipe = QuantRecipe(scheme="a16w8")
    assert recipe.label().endswith("headf")
    label, doc = label_as_built(recipe, "int16")
    assert label.endswith("head16") and "Transpose" in doc["why"]
    assert label_as_built(recipe, "float") == (recipe.label(), {"precision": "float"})
