"""RMSNorm fused for QNN HTP (``recipe.fuse_norms``): the decomposed chain overflows fp16 on the
HTP emulator once |x| is large; the fused ``SimplifiedLayerNormalization`` does not, and on CPU
the fused static graphs still match PyTorch."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from helpers.static_fixtures import static_artifact_path

from slmedge.exporter.onnx.static_shapes import fuse_artifact_norms, fuse_rms_norms
from slmedge.runtimes.sessions.static_decoder import StaticDecoder

HAS_QNN = importlib.util.find_spec("onnxruntime_qnn") is not None
HIDDEN, EPS = 64, 1e-5
#: max |x| per row: tiny, ordinary, large, SmolLM2-135M's residual (23,138) and beyond
ROW_SCALES = (1e-3, 1.0, 300.0, 25_000.0)


def _torch_style_rms_norm() -> onnx.ModelProto:
    """The chain torch exports for an fp16 LlamaRMSNorm (computed in fp32, weight in fp16)."""
    rng = np.random.default_rng(0)
    weight = (rng.random(HIDDEN) + 0.5).astype(np.float16)
    inits = [numpy_helper.from_array(weight, "weight"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             numpy_helper.from_array(np.array([-1], np.int64), "axes"),
             numpy_helper.from_array(np.array(EPS, np.float32), "eps")]
    nodes = [helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT),
             helper.make_node("Pow", ["x32", "two"], ["sq"]),
             helper.make_node("ReduceMean", ["sq", "axes"], ["mean"], keepdims=1,
                               noop_with_empty_axes=0),
             helper.make_node("Add", ["mean", "eps"], ["var"]),
             helper.make_node("Sqrt", ["var"], ["std"]),
             helper.make_node("Reciprocal", ["std"], ["inv"]),
             helper.make_node("Mul", ["x32", "inv"], ["normed"]),
             helper.make_node("Cast", ["normed"], ["normed16"], to=TensorProto.FLOAT16),
             helper.make_node("Mul", ["normed16", "weight"], ["y"])]
    shape = [1, len(ROW_SCALES), HIDDEN]
    graph = helper.make_graph(nodes, "rms_norm", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT16, shape)], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT16, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model


def _rows() -> np.ndarray:
    x = np.random.default_rng(1).standard_normal((1, len(ROW_SCALES), HIDDEN))
    for i, scale in enumerate(ROW_SCALES):
        x[0, i] *= scale / np.abs(x[0, i]).max()
    return x.astype(np.float16)


def _numpy_rms_norm(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + EPS) * weight.astype(np.float64)


def _relative_error_per_row(model: onnx.ModelProto, path, providers=None) -> np.ndarray:
    from slmedge.runtimes.sessions.onnx_decoder import make_session

    onnx.save(model, str(path))
    session = make_session(path, providers=providers, strict=providers is not None,
                           allow_cpu_fallback=providers is None)
    x = _rows()
    got = session.run(None, {"x": x})[0].astype(np.float64)
    weight = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "weight"))
    want = _numpy_rms_norm(x, weight)
    return np.abs(got - want).max(-1)[0] / np.abs(want).max(-1)[0]


def test_fusion_replaces_the_chain_and_matches_numpy_on_cpu(tmp_path):
    chain = _torch_style_rms_norm()
    fused, count = fuse_rms_norms(chain)
    assert count == 1
    ops = [n.op_type for n in fused.graph.node]
    assert ops == ["SimplifiedLayerNormalization"], ops
    node = fused.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["epsilon"] == pytest.approx(EPS) and attrs["stash_type"] == TensorProto.FLOAT
    # CPU computes both in fp32: equal up to the fp16 output rounding, on every row
    for model, name in ((chain, "chain"), (fused, "fused")):
        err = _relative_error_per_row(model, tmp_path / f"{name}.onnx")
        assert (err < 1e-3).all(), (name, err)


@pytest.mark.qnn
@pytest.mark.skipif(not HAS_QNN, reason="onnxruntime-qnn is not installed here "
                    "(wheels: Linux x86_64 / Windows, Python >= 3.11)")
def test_fused_norm_does_not_overflow_fp16_on_the_qnn_htp_emulator(tmp_path):
    """Every node on the HTP (CPU fallback off). The chain's x^2 overflows fp16 on the row with
    |x| = 25,000 (garbage); the fused op stays within fp16 precision on every row."""
    from slmedge.device_profiles import load_profile

    htp = [(n, o) for n, o in load_profile("android-qnn-htp-fp16").provider_specs()
           if n == "QNNExecutionProvider"]
    chain = _torch_style_rms_norm()
    fused, _ = fuse_rms_norms(chain)
    err_chain = _relative_error_per_row(chain, tmp_path / "chain.onnx", htp)
    err_fused = _relative_error_per_row(fused, tmp_path / "fused.onnx", htp)
    assert (err_chain[:2] < 5e-3).all()  # small rows: the chain is fine in fp16
    assert err_chain[-1] > 1.0, err_chain  # |x| 25,000: overflowed
    assert (err_fused < 5e-3).all(), err_fused


def test_static_export_with_fused_norms_matches_pytorch(tmp_path, tiny_dir):
    """export_static(fuse_norms=True) on tiny Llama: one SimplifiedLayerNormalization per
    norm, no Pow left, logits of prefill + decode equal to PyTorch's."""
    import torch
    from transformers import AutoModelForCausalLM

    from slmedge.exporter.architectures.registry import get_spec
    from slmedge.exporter.onnx.static_shapes import export_static

    hf = tiny_dir("llama")
    model = AutoModelForCausalLM.from_pretrained(hf, attn_implementation="sdpa").eval()
    info = export_static(model, get_spec(model.config.model_type), tmp_path,
                         context_length=24, prefill_chunk=8, fuse_norms=True)
    norms = 2 * model.config.num_hidden_layers + 1
    static = info.to_manifest()
    assert static["norms"]["count"] == {"prefill": norms, "decode": norms}
    assert "overflow" in static["norms"]["why"]
    for file in ("prefill.onnx", "decode.onnx"):
        ops = [n.op_type for n in onnx.load(str(tmp_path / file), load_external_data=False)
               .graph.node]
        assert ops.count("SimplifiedLayerNormalization") == norms and "Pow" not in ops
    decoder = StaticDecoder(tmp_path, static)
    ids = np.random.default_rng(2).integers(0, 128, 14).tolist()
    got = [decoder.step(ids[:10], all_logits=True)]
    got += [decoder.step([t], all_logits=True) for t in ids[10:]]
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(np.concatenate(got), ref, atol=1e-4, rtol=0)


def test_fusing_a_written_artifact_keeps_its_logits(tmp_path_factory, tiny_dir, tmp_path):
    """fuse_artifact_norms rewrites the graph files of an exported artifact in place (the
    shared weights file untouched): same logits on CPU."""
    source = static_artifact_path(tmp_path_factory, tiny_dir, "llama")
    work = tmp_path / "fused"
    shutil.copytree(source, work)
    static = json.loads((work / "manifest.json").read_text())["static"]
    data = (work / "model.onnx.data").read_bytes()
    assert fuse_artifact_norms(work) == {"prefill": 5, "decode": 5}
    assert (work / "model.onnx.data").read_bytes() == data
    assert fuse_artifact_norms(work) == {"prefill": 0, "decode": 0}  # idempotent
    manifest = json.loads((work / "manifest.json").read_text())
    assert manifest["static"]["norms"]["count"] == {"prefill": 5, "decode": 5}
    from slmedge.runtimes.artifact import open_artifact

    open_artifact(work)  # sizes and hashes of the rewritten graphs are the manifest's
    ids = np.random.default_rng(3).integers(0, 128, 12).tolist()
    np.testing.assert_allclose(StaticDecoder(work, static).logits(ids),
                               StaticDecoder(source, static).logits(ids), atol=1e-5, rtol=0)


def test_a16w8_keeps_the_fused_norms_float_and_runs_on_the_htp(tiny_dir, tmp_path):
    """The android-qnn-htp recipe (a16w8, opset 21 as profile_export picks it) on fused graphs:
    every SimplifiedLayerNormalization stays float (profile float_ops; recorded in the decision
    tables), the QDQ graphs track the float ones on CPU, and on the HTP emulator every node is
    placed with CPU fallback off and tracks them too."""
    from transformers import AutoModelForCausalLM

    from slmedge.device_profiles import load_profile
    from slmedge.exporter.architectures.registry import get_spec
    from slmedge.exporter.onnx.profile import A16W8_OPSET
    from slmedge.exporter.quantize.recipe import QuantRecipe
    from slmedge.exporter.onnx.static_shapes_qdq import quantize_static_graphs, static_quality
    from slmedge.exporter.onnx.static_shapes import export_static

    profile = load_profile("android-qnn-htp")
    assert profile.recipe.fuse_norms and "SimplifiedLayerNormalization" in profile.recipe.float_ops
    model = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"),
                                                 attn_implementation="sdpa").eval()
    fused, work = tmp_path / "fused", tmp_path / "a16w8"
    fused.mkdir()
    static = export_static(model, get_spec("llama"), fused, context_length=32, prefill_chunk=8,
                           opset=A16W8_OPSET, fuse_norms=True,
                           norm_weight_apart=True).to_manifest()
    assert "separate Mul" in static["norms"]["weight"]
    shutil.copytree(fused, work)
    ids = np.random.default_rng(4).integers(6, 128, 300).tolist()
    report = quantize_static_graphs(work, static, QuantRecipe(scheme="a16w8"), ids,
                                    float_ops=list(profile.recipe.float_ops))
    assert "SimplifiedLayerNormalization" in report["float_ops"]
    for table in report["tables"].values():
        assert table["SimplifiedLayerNormalization"]["quantized"] == 0
        assert table["SimplifiedLayerNormalization"]["float"] == 5
        assert table["MatMul"]["quantized"] > 0
    card = static_quality(StaticDecoder(fused, static), StaticDecoder(work, static), ids,
                          window=16, prompts=1, prompt_tokens=8, new_tokens=4)
    assert card.cosine_mean > 0.98, card
    if not HAS_QNN:
        return
    htp = StaticDecoder(work, static, strict=True, allow_cpu_fallback=False,
                        providers=profile.provider_specs())
    for kind, place in htp.placement.items():
        assert place.nodes_by_provider == {"QNNExecutionProvider": place.total_nodes}, kind
    htp_card = static_quality(StaticDecoder(fused, static), htp, ids, window=16, prompts=1,
                              prompt_tokens=8, new_tokens=4)
    assert htp_card.cosine_mean > 0.95, htp_card


HEAD_HIDDEN = 576  # SmolLM2-135M's width: at 64 the HTP finalizes both forms


def _qdq_norm_into_tied_head(rows: int) -> onnx.ModelProto:
    """16-bit QDQ: SimplifiedLayerNormalization(x, w) -> MatMul with a weight computed in the
    graph (Transpose of an embedding, 16-bit QDQ): the shape of a tied lm_head in a16w8."""
    ms = "com.microsoft"
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array((rng.random(HEAD_HIDDEN) + 0.5).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((10, HEAD_HIDDEN)).astype(np.float32) * 0.05,
                                     "embedding")]
    nodes = []

    def qdq(src, name, scale):
        inits.extend([numpy_helper.from_array(np.array(scale, np.float32), f"{name}_s"),
                      numpy_helper.from_array(np.array(32768, np.uint16), f"{name}_z")])
        nodes.extend([helper.make_node("QuantizeLinear", [src, f"{name}_s", f"{name}_z"],
                                       [f"{name}_q"], domain=ms),
                      helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"],
                                       [name], domain=ms)])

    qdq("x", "xd", 1.0)
    nodes.append(helper.make_node("SimplifiedLayerNormalization", ["xd", "w"], ["normed"],
                                  axis=-1, epsilon=EPS, stash_type=1))
    qdq("normed", "nd", 1e-3)
    nodes.append(helper.make_node("Transpose", ["embedding"], ["head"], perm=[1, 0]))
    qdq("head", "hd", 1e-5)
    nodes.append(helper.make_node("MatMul", ["nd", "hd"], ["mm"]))
    qdq("mm", "logits", 1e-3)
    graph = helper.make_graph(
        nodes, "tied_head", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                           [1, rows, HEAD_HIDDEN])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, rows, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid(ms, 1)])
    model.ir_version = 10
    return model


@pytest.mark.qnn
@pytest.mark.skipif(not HAS_QNN, reason="onnxruntime-qnn is not installed here "
                    "(wheels: Linux x86_64 / Windows, Python >= 3.11)")
def test_norm_weight_apart_lets_the_htp_finalize_a_qdq_norm_before_a_tied_head(tmp_path):
    """onnxruntime-qnn 2.7.0 cannot finalize the 64-row graph with the weight inside the norm
    (what SmolLM2's a16w8 prefill hit); with the weight as a separate Mul it compiles, and the
    numbers on CPU are the same."""
    from slmedge.device_profiles import load_profile
    from slmedge.exporter.onnx.static_shapes import _norm_weights_apart
    from slmedge.runtimes.errors import SlmEdgeError
    from slmedge.runtimes.sessions.onnx_decoder import make_session

    htp = [(n, o) for n, o in load_profile("android-qnn-htp").provider_specs()
           if n == "QNNExecutionProvider"]
    inside = _qdq_norm_into_tied_head(64)
    apart = _qdq_norm_into_tied_head(64)
    _norm_weights_apart(apart)
    assert [n.op_type for n in apart.graph.node][2:4] == ["SimplifiedLayerNormalization", "Mul"]
    onnx.save(inside, str(tmp_path / "inside.onnx"))
    onnx.save(apart, str(tmp_path / "apart.onnx"))
    with pytest.raises(SlmEdgeError, match="QNN_COMMON_ERROR_MEM_ALLOC"):
        make_session(tmp_path / "inside.onnx", providers=htp, strict=True,
                     allow_cpu_fallback=False)
    make_session(tmp_path / "apart.onnx", providers=htp, strict=True, allow_cpu_fallback=False)
    x = {"x": np.random.default_rng(6).standard_normal((1, 64, HEAD_HIDDEN)).astype(np.float32)}
    np.testing.assert_array_equal(make_session(tmp_path / "inside.onnx").run(None, x)[0],
                                  make_session(tmp_path / "apart.onnx").run(None, x)[0])
