"""Quantized tiny decoders: structure (what is quantized, what stayed float) and numerics.

Numerics, ExecuTorch-style: the int4 graph is compared with the fp32 graph *carrying the
same quantized weights* (dequantized back into its MatMuls), so the only difference
left is the kernel's arithmetic, which must be tiny; the fp32-vs-int4 error itself is
bounded in quantization steps by tests/unit/quantize/test_weight_only_steps.py.
"""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from slmedge.exporter.quantize.calibration import KVCacheCalibrationReader
from slmedge.exporter.quantize.core import quantize_model
from slmedge.exporter.quantize.fold_zero_points import materialize_corrections
from slmedge.exporter.quantize.graph import analyze, fold_weight_transposes, split_gemms
from slmedge.exporter.quantize.pack_matmuls import pack_shared_input_matmuls
from slmedge.exporter.quantize.recipe import CalibrationConfig, QuantRecipe
from slmedge.exporter.quantize.qdq import qdq_summary
from slmedge.runtimes.sessions.onnx_decoder import OnnxDecoder

SMALL_CALIB = {"prefill_samples": 2, "decode_samples": 6, "prefill_tokens": 32, "max_past": 64}
IDS = list(range(6, 40))


def _attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def zero_point_correction(node, graph, inits) -> np.ndarray | None:
    """``M`` [K / block, N] of a node whose float zero points were folded: its output feeds
    an ``Add`` with ``MatMul(blocksum(x), M)`` (fold_zero_points.py); None if not folded."""
    made_by = {o: n for n in graph.node for o in n.output}
    for add in graph.node:
        if add.op_type == "Add" and node.output[0] in add.input:
            other = made_by.get(next(i for i in add.input if i != node.output[0]))
            if other is not None and other.op_type == "MatMul" and other.input[1] in inits:
                return inits[other.input[1]]
    return None


def dequantize_nbits(node, inits, correction=None) -> np.ndarray:
    """[K, N] float weights of a MatMulNBits node (a test reference, not a quantizer).

    ``correction``: the folded zero points' ``M``; ``x @ W + blocksum(x) @ M`` is
    ``x @ (W + M repeated block times along K)``, so it is added to each block's rows."""
    a = _attrs(node)
    k, n, bits, block = a["K"], a["N"], a["bits"], a["block_size"]
    packed = inits[node.input[1]].reshape(n, -1)
    q = np.stack([packed & 15, packed >> 4], axis=-1).reshape(n, -1) if bits == 4 else packed
    q = q.astype(np.float32)
    blocks = q.shape[1] // block
    scales = inits[node.input[2]].reshape(n, blocks)
    if len(node.input) > 3 and node.input[3] and inits[node.input[3]].dtype != np.uint8:
        zp = inits[node.input[3]].reshape(n, blocks).astype(np.float32)  # HQQ: float zero points
    elif len(node.input) > 3 and node.input[3]:
        zp = inits[node.input[3]].reshape(n, -1)
        if bits == 4:
            zp = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(n, -1)[:, :blocks]
        zp = zp.astype(np.float32)
    else:
        zp = np.full((n, blocks), 8.0 if bits == 4 else 128.0, np.float32)
    w = (q.reshape(n, blocks, block) - zp[:, :, None]) * scales[:, :, None]
    if correction is not None:
        w = w + correction.T.reshape(n, blocks, 1)
    return w.reshape(n, -1)[:, :k].T


@pytest.fixture(scope="module")
def llama(tiny_artifact):
    """The tiny Llama exported without fusion: standard ONNX ops, as NPU recipes need (the
    session's export, shared with test_fusion.py and test_package_data.py; read only)."""
    return tiny_artifact("llama", fuse=False)


def _facts(path, packed=False):
    """The graph facts the quantizer sees; ``packed``: weight-only schemes first pack the
    MatMuls that read one input (q/k/v, gate/up: pack_matmuls.py)."""
    model = onnx.load(str(path))
    split_gemms(model)
    fold_weight_transposes(model)
    if packed:
        pack_shared_input_matmuls(model)
    return analyze(model)


def test_int4_on_the_fused_graph(tiny_artifact, tmp_path):
    art = tiny_artifact("llama")  # fused by default: GroupQueryAttention, fused norms
    out, report = _quantize(art, tmp_path, scheme="int4", algorithm="rtn")
    ops = {n.op_type for n in onnx.load(str(out), load_external_data=False).graph.node}
    assert {"MatMulNBits", "GroupQueryAttention"} <= ops and "MatMul" not in ops
    got = OnnxDecoder(out).logits(IDS)
    want = OnnxDecoder(art / "model.onnx").logits(IDS)
    assert np.isfinite(got).all() and (got.argmax(-1) == want.argmax(-1)).mean() > 0.5
    # the fusion's own nodes (layers.N.attn.qkv_proj: no name scopes) still have a layer,
    # so --keep-layers and --auto reach them
    facts = _facts(art / "model.onnx")
    assert any(w.node.endswith("qkv_proj") for w in facts.body_matmuls())
    assert all(w.layer is not None for w in facts.body_matmuls())


def test_static_qdq_refuses_a_fused_graph(tiny_artifact, tmp_path):
    from slmedge.runtimes.errors import UsageError

    with pytest.raises(UsageError, match="--no-fuse"):
        _quantize(tiny_artifact("llama"), tmp_path, scheme="a16w8", calibration=SMALL_CALIB)


def _quantize(art, tmp_path, **recipe):
    out = tmp_path / "q.onnx"
    report = quantize_model(art / "model.onnx", out, QuantRecipe(**recipe), tokenizer_dir=art)
    return out, report


@pytest.mark.parametrize("block,symmetric,algorithm", [(32, False, None), (64, True, None),
                                                       (32, False, "gptq-act")])
def test_int4_equals_fp32_graph_with_the_same_quantized_weights(llama, tmp_path, block, symmetric,
                                                                algorithm):
    extra = {"algorithm": algorithm, "calibration": SMALL_CALIB} if algorithm else {}
    out, report = _quantize(llama, tmp_path, scheme="int4", block_size=block, symmetric=symmetric,
                            accuracy_level=1, **extra)
    q = onnx.load(str(out))
    materialize_corrections(q)  # zero-point codes -> the fp32 M that ORT folds them to
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    deq = {}
    for node in q.graph.node:
        if node.op_type == "MatMulNBits":
            fix = zero_point_correction(node, q.graph, inits)
            deq[node.name.rsplit("_Q", 1)[0]] = dequantize_nbits(node, inits, fix)
    if algorithm == "gptq-act":  # integer zero points: no correction term, fast kernels
        assert report.zero_points is None
        assert not any(zero_point_correction(n, q.graph, inits) is not None
                       for n in q.graph.node if n.op_type == "MatMulNBits")
        assert report.calibration["prefill_samples"] == SMALL_CALIB["prefill_samples"]
    ref = onnx.load(str(llama / "model.onnx"))
    fold_weight_transposes(ref)
    pack_shared_input_matmuls(ref)
    facts = analyze(ref)
    assert set(deq) == {w.node for w in facts.weight_matmuls}
    for node in ref.graph.node:
        if node.name in deq:
            name = node.input[1] + "_dq"
            ref.graph.initializer.append(numpy_helper.from_array(deq[node.name], name))
            node.input[1] = name
    ref_path = tmp_path / "ref.onnx"
    onnx.save(ref, str(ref_path))
    want = OnnxDecoder(ref_path).logits(IDS)
    # the int8 lm_head is written at level 4 (QuantRecipe.level_for: int8 activations); the
    # weights are checked here, so every node computes in fp32
    level1 = onnx.load(str(out))
    assert {(_attrs(n)["bits"], _attrs(n)["accuracy_level"]) for n in level1.graph.node
            if n.op_type == "MatMulNBits"} == {(4, 1), (8, 4)}
    for node in level1.graph.node:
        for attr in node.attribute:
            if node.op_type == "MatMulNBits" and attr.name == "accuracy_level":
                attr.i = 1
    onnx.save(level1, str(tmp_path / "q-level1.onnx"))
    got = OnnxDecoder(tmp_path / "q-level1.onnx").logits(IDS)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)
    # and the quantization did change the model
    assert np.abs(got - OnnxDecoder(llama / "model.onnx").logits(IDS)).max() > 1e-3


def test_int4_structure_and_lm_head_precision(llama, tmp_path):
    out, report = _quantize(llama, tmp_path, scheme="int4", algorithm="rtn", block_size=32,
                            embedding="int4")
    q = onnx.load(str(out), load_external_data=False)
    facts = _facts(llama / "model.onnx", packed=True)
    nbits = [n for n in q.graph.node if n.op_type == "MatMulNBits"]
    bits = sorted(_attrs(n)["bits"] for n in nbits)
    assert bits == [4] * (len(facts.weight_matmuls) - 1) + [8]  # lm_head int8 by default
    assert all(_attrs(n)["accuracy_level"] == 4 and _attrs(n)["block_size"] == 32 for n in nbits)
    head = next(n for n in nbits if n.name.startswith(facts.lm_head))
    assert _attrs(head)["bits"] == 8 and head.output[0] == "logits"
    # attention's activation x activation MatMuls stay float MatMul
    assert sum(n.op_type == "MatMul" for n in q.graph.node) == len(facts.activation_matmuls)
    assert [n.op_type for n in q.graph.node].count("GatherBlockQuantized") == 1
    assert report.weight_precision == {"int4": len(facts.weight_matmuls) - 1, "int8": 1}
    assert report.lm_head == "int8" and report.embedding == "int4"


def test_keep_layers_go_one_step_up(llama, tmp_path):
    out, report = _quantize(llama, tmp_path, scheme="int4", algorithm="rtn", keep_layers=[0],
                            lm_head="float")
    q = onnx.load(str(out), load_external_data=False)
    by_bits = [_attrs(n)["bits"] for n in q.graph.node if n.op_type == "MatMulNBits"]
    # 7 projections per Llama layer, packed into 4: qkv, o, gate+up, down
    assert by_bits.count(8) == 4 and by_bits.count(4) == 4
    assert report.lm_head == "float"


def test_static_int8_quantizes_weight_matmuls_only_and_keeps_the_mask_path_float(llama, tmp_path):
    out, report = _quantize(llama, tmp_path, scheme="int8-static", calibration=SMALL_CALIB)
    summary = qdq_summary(out)
    consumers = summary["ops_with_dq_inputs"]
    facts = _facts(llama / "model.onnx")
    assert consumers == {"MatMul": len(facts.weight_matmuls) - 1}  # lm_head float by default
    table = report.op_decisions
    assert table["Softmax"]["quantized"] == 0
    assert any("mask" in r for r in table["Softmax"]["reasons"])
    for op in ("Add", "Pow", "ReduceMean", "Sqrt", "Mul"):
        assert table[op]["quantized"] == 0, op
    assert report.calibration["samples"] == 8
    got = OnnxDecoder(out).logits(IDS)
    want = OnnxDecoder(llama / "model.onnx").logits(IDS)
    cos = (got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want)
    assert cos > 0.93  # 14 int8 MatMuls of a random 2-layer model, 8 calibration samples


def test_a16w8_uses_16_bit_activations_and_leaves_softmax_and_mask_add_float(llama, tmp_path):
    out, report = _quantize(llama, tmp_path, scheme="a16w8", calibration=SMALL_CALIB)
    q = onnx.load(str(out), load_external_data=False)
    inits = {i.name: i for i in q.graph.initializer}
    zp_types = {inits[n.input[2]].data_type for n in q.graph.node
                if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits}
    assert onnx.TensorProto.UINT16 in zp_types
    consumers = qdq_summary(out)["ops_with_dq_inputs"]
    assert "Softmax" not in consumers
    assert {"MatMul", "Mul"} <= set(consumers)
    # the residual stream (residual Adds, the norms reading it and their statistics) and the
    # rotary angle stay float, as in the static graphs' a16w8 step (the embedding lookup is
    # 16-bit: layer 0's norm reads its DQ, so Pow is not checked among the consumers)
    from slmedge.exporter.onnx.static_shapes_qdq import POSITION_REASON, RESIDUAL_REASON

    assert not {"ReduceMean", "Sqrt", "Cos", "Sin"} & set(consumers)
    assert RESIDUAL_REASON in report.op_decisions["Add"]["reasons"]
    assert report.op_decisions["Pow"]["quantized"] == 0
    assert POSITION_REASON in report.op_decisions["Cos"]["reasons"]
    facts = _facts(llama / "model.onnx")
    mask_adds = [n for n in facts.mask_path if n.startswith("node_add") or "Add" in n]
    producer = {o: n for n in q.graph.node for o in n.output}

    def source(tensor):  # the float tensor behind a Q -> DQ pair
        dq = producer.get(tensor)
        if dq is None or dq.op_type != "DequantizeLinear":
            return None
        q_node = producer.get(dq.input[0])
        return producer.get(q_node.input[0]) if q_node is not None else None

    for node in q.graph.node:
        if node.name in facts.mask_path:
            # mask values travel unquantized (the scores they meet may be 16-bit)
            for tensor in node.input:
                src = source(tensor)
                assert src is None or src.name not in facts.mask_path, (node.name, tensor)
            assert node.op_type != "Softmax" or source(node.input[0]) is None
    assert mask_adds or facts.mask_path  # the mask path was found at all
    assert report.op_decisions["Softmax"]["quantized"] == 0
    got = OnnxDecoder(out).logits(IDS)
    want = OnnxDecoder(llama / "model.onnx").logits(IDS)
    cos = (got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want)
    assert cos > 0.98  # int8 weights dominate; 16-bit activations everywhere off the mask path


def test_int8_dynamic_qoperator(llama, tmp_path):
    out, report = _quantize(llama, tmp_path, scheme="int8", int8_format="qoperator", lm_head="float")
    ops = {n.op_type for n in onnx.load(str(out), load_external_data=False).graph.node}
    assert ops & {"DynamicQuantizeMatMul", "MatMulInteger"}
    assert report.lm_head == "float"


def test_gemm_models_are_split_for_weight_only(tiny_artifact, tmp_path):
    art = tiny_artifact("gpt2")
    out, report = _quantize(art, tmp_path, scheme="int4", algorithm="rtn")
    ops = [n.op_type for n in onnx.load(str(out), load_external_data=False).graph.node]
    assert "Gemm" not in ops and "MatMul" not in ops
    assert ops.count("MatMulNBits") == sum(report.weight_precision.values()) >= 9
    assert np.isfinite(OnnxDecoder(out).logits(IDS)).all()


def test_calibration_reader_feeds_the_fp32_models_own_cache(llama):
    import onnxruntime as ort

    ids = list(range(5, 125))  # unique tokens: a sample's token tells where it sits
    cfg = CalibrationConfig(**SMALL_CALIB)
    reader = KVCacheCalibrationReader(llama / "model.onnx", ids, cfg)
    samples = list(reader.samples())
    assert len(samples) == len(reader) == 8
    prefill, decode = samples[:2], samples[2:]
    assert all(s["input_ids"].shape == (1, 32) and s["past_key_values.0.key"].shape[2] == 0
               for s in prefill)
    lengths = [s["past_key_values.0.key"].shape[2] for s in decode]
    assert all(1 <= p <= 64 for p in lengths) and len(set(lengths)) > 1
    session = ort.InferenceSession(str(llama / "model.onnx"), providers=["CPUExecutionProvider"])
    for s, p in zip(decode, lengths, strict=False):
        assert s["attention_mask"].shape == (1, p + 1) and s["position_ids"].tolist() == [[p]]
        pos = ids.index(int(s["input_ids"][0, 0]))
        prefix = np.array([ids[pos - p : pos]], dtype=np.int64)
        empty = np.zeros((1, *s["past_key_values.0.key"].shape[1:2], 0,
                          s["past_key_values.0.key"].shape[3]), np.float32)
        feed = {"input_ids": prefix, "attention_mask": np.ones_like(prefix),
                "position_ids": np.arange(p, dtype=np.int64)[None]}
        feed |= {n: empty for n in s if n.startswith("past_key_values")}
        present = session.run(["present.1.value"], feed)[0]
        np.testing.assert_allclose(s["past_key_values.1.value"], present, atol=1e-5)


def test_int8_embedding_lookup_in_an_int4_recipe(llama, tmp_path):
    out, report = _quantize(llama, tmp_path, scheme="int4", algorithm="rtn", embedding="int8")
    q = onnx.load(str(out), load_external_data=False)
    gbq = [n for n in q.graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(gbq) == 1 and _attrs(gbq[0])["bits"] == 8
    assert report.embedding == "int8" and report.label.endswith("emb8")
    got = OnnxDecoder(out).logits(IDS)
    want = OnnxDecoder(llama / "model.onnx").logits(IDS)
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.5


def test_gptq_act_recipe_needs_zero_points():
    with pytest.raises(ValueError, match="gptq-act computes a zero point per block"):
        QuantRecipe(scheme="int4", algorithm="gptq-act", symmetric=True)
