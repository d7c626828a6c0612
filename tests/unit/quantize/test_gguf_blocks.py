"""GGUF Q4_0 / Q8_0 tensors as MatMulNBits weights without requantization (gguf_blocks.py).

GGUFs are written with the gguf package (the tensors of a tiny model from
tests/helpers/gguf_writer.py, quantized by gguf's own Q4_0 / Q8_0 code), read back with
``gguf.GGUFReader``, mapped to MatMulNBits, and run through onnxruntime: the logits equal
``x @ dequantize(file)`` (gguf's own dequantizer) to fp32 rounding, and the weights
MatMulNBits reads are the file's dequantized values bit for bit.
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers.gguf_writer import gguf_tensors, tiny_gguf_model
from onnx import TensorProto, helper, numpy_helper

from slmedge.exporter.quantize.gguf_blocks import blocks_from_gguf, dequantize
from slmedge.runtimes.errors import UnsupportedOp

gguf = pytest.importorskip("gguf")
IDS = list(range(6, 40))


def write_matrices(path, matrices: dict[str, np.ndarray], qtype) -> None:
    """A GGUF holding each ``[N, K]`` matrix (PyTorch's Linear layout) quantized to ``qtype``."""
    w = gguf.GGUFWriter(str(path), "llama")
    for name, m in matrices.items():
        w.add_tensor(name, gguf.quants.quantize(m.astype(np.float32), qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def nbits_logits(blocks, x: np.ndarray, accuracy_level: int = 0) -> np.ndarray:
    """``x @ W`` through one MatMulNBits node built from ``blocks``."""
    inits = [numpy_helper.from_array(blocks.packed, "B"),
             numpy_helper.from_array(blocks.scales, "scales")]
    node = helper.make_node("MatMulNBits", ["x", "B", "scales"], ["y"], domain="com.microsoft",
                            **blocks.attributes(accuracy_level))
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, blocks.k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, blocks.n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.fixture(scope="module")
def tiny_matrices():
    """The 2-D weights of the tiny Llama in llama.cpp's names and layouts, plus a wide one."""
    model = tiny_gguf_model("llama")
    mats = {n: a for n, a in gguf_tensors(model, "llama").items() if a.ndim == 2}
    mats["wide"] = np.random.default_rng(3).standard_normal((40, 256)).astype(np.float32)
    return mats


@pytest.mark.parametrize("qtype_name, bits", [("Q4_0", 4), ("Q8_0", 8)])
def test_gguf_blocks_run_as_matmul_nbits_without_requantization(qtype_name, bits, tiny_matrices,
                                                                 tmp_path):
    qtype = gguf.GGMLQuantizationType[qtype_name]
    path = tmp_path / f"tiny-{qtype_name}.gguf"
    write_matrices(path, tiny_matrices, qtype)
    reader = gguf.GGUFReader(str(path))
    assert {t.name for t in reader.tensors} == set(tiny_matrices)
    rng = np.random.default_rng(0)
    for tensor in reader.tensors:
        assert tensor.tensor_type == qtype
        blocks = blocks_from_gguf(tensor)
        n, k = tiny_matrices[tensor.name].shape
        assert (blocks.k, blocks.n, blocks.bits, blocks.block_size) == (k, n, bits, 32)
        assert blocks.zero_points is None  # the default zero point is the format's own
        file_w = gguf.quants.dequantize(tensor.data, qtype).reshape(n, k).T  # [K, N]
        # the weights MatMulNBits reads are the file's, bit for bit
        np.testing.assert_array_equal(dequantize(blocks), file_w)
        # and the kernel computes with them: x @ W to fp32 rounding
        x = rng.standard_normal((5, k)).astype(np.float32)
        want = x.astype(np.float64) @ file_w.astype(np.float64)
        got = nbits_logits(blocks, x)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
        # a requantization would have moved them: the original float weights differ
        assert not np.array_equal(file_w, tiny_matrices[tensor.name].T)


def test_nibble_order_is_reordered_not_copied(tmp_path):
    """Q4_0 keeps value j and j + 16 in one byte; MatMulNBits values 2i and 2i + 1: a block
    0, 1, ..., 31 (times a scale) must come back in order."""
    ramp = (np.arange(32) // 2 - 8).astype(np.float32)  # -8, -8, -7, ..., 7, 7: scale 1, exact
    m = np.stack([ramp, ramp[::-1]])
    write_matrices(tmp_path / "ramp.gguf", {"ramp": m}, gguf.GGMLQuantizationType.Q4_0)
    tensor = gguf.GGUFReader(str(tmp_path / "ramp.gguf")).tensors[0]
    w = dequantize(blocks_from_gguf(tensor))
    np.testing.assert_array_equal(w, m.T)  # every value at its own place


def test_other_gguf_types_are_refused_by_name(tmp_path):
    m = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    write_matrices(tmp_path / "q41.gguf", {"w": m}, gguf.GGMLQuantizationType.Q4_1)
    tensor = gguf.GGUFReader(str(tmp_path / "q41.gguf")).tensors[0]
    with pytest.raises(UnsupportedOp, match="Q4_1 has no exact MatMulNBits form; exact: Q4_0, Q8_0"):
        blocks_from_gguf(tensor)


def test_fp16_graph_scales(tiny_matrices, tmp_path):
    write_matrices(tmp_path / "q8.gguf", {"w": tiny_matrices["wide"]}, gguf.GGMLQuantizationType.Q8_0)
    tensor = gguf.GGUFReader(str(tmp_path / "q8.gguf")).tensors[0]
    b16, b32 = blocks_from_gguf(tensor, np.float16), blocks_from_gguf(tensor)
    assert b16.scales.dtype == np.float16
    np.testing.assert_array_equal(b16.scales.astype(np.float32), b32.scales)  # fp16 -> fp32 exact
    assert onnx.helper.np_dtype_to_tensor_dtype(b16.scales.dtype) == TensorProto.FLOAT16


@pytest.mark.parametrize("qtype_name, recipe", [
    ("Q4_0", dict(scheme="int4", symmetric=True, lm_head="int4")),
    ("Q8_0", dict(scheme="int8", lm_head="int8")),
])
def test_streaming_quantizer_writes_a_sources_blocks_as_they_are(qtype_name, recipe, tiny_artifact,
                                                                  tmp_path):
    """Every weight of the tiny Llama as a GGUF would hold it (gguf's own Q4_0 / Q8_0 of the
    ``[N, K]`` rows): the fp32 graph of the file's values, quantized by
    quantize_file_streaming with ``exact``, computes the same logits to fp32 rounding; the
    gate/up MatMuls it packs take both parts' blocks side by side."""
    from slmedge.exporter.quantize.gguf_blocks import blocks_from_bytes
    from slmedge.exporter.quantize.graph import analyze
    from slmedge.exporter.quantize.recipe import QuantRecipe
    from slmedge.exporter.quantize.streaming import quantize_file_streaming
    from slmedge.runtimes.sessions.onnx_decoder import OnnxDecoder

    qtype = gguf.GGMLQuantizationType[qtype_name]
    model = onnx.load(str(tiny_artifact("llama") / "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    source_blocks = {}
    for w in analyze(model).weight_matmuls:
        rows = numpy_helper.to_array(inits[w.weight]).T.astype(np.float32)  # [N, K], as in a GGUF
        blocks = blocks_from_bytes(gguf.quants.quantize(rows, qtype), qtype_name, w.k, w.n)
        source_blocks[w.module] = blocks
        inits[w.weight].CopyFrom(numpy_helper.from_array(dequantize(blocks), w.weight))
    assert any(m.endswith("gate_proj") for m in source_blocks)
    ref = tmp_path / "ref" / "model.onnx"
    ref.parent.mkdir()
    onnx.save_model(model, str(ref), save_as_external_data=True, location="model.onnx.data")
    rec = QuantRecipe(**recipe, accuracy_level=1)  # fp32 arithmetic: no int8 activations
    exact = tmp_path / "exact" / "model.onnx"
    exact.parent.mkdir()
    report = quantize_file_streaming(ref, exact, rec, exact=source_blocks.get)
    nbits = [n for n in onnx.load(str(exact), load_external_data=False).graph.node
             if n.op_type == "MatMulNBits"]
    bits = 4 if qtype_name == "Q4_0" else 8
    assert sorted(n.name for n in nbits) == sorted(f"{node}_Q{bits}" for node in report.exact_blocks)
    assert len(report.exact_blocks) == len(nbits) == len(source_blocks) - 2  # 2 layers' gate+up packed
    want = OnnxDecoder(ref).logits(IDS)
    got = OnnxDecoder(exact).logits(IDS)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())
    # quantizing the file's values again instead (RTN on the dequantized weights) moves them
    # for Q8_0 (ORT's 8-bit grid is not Q8_0's); Q4_0's symmetric grid happens to be RTN's
    again = tmp_path / "again" / "model.onnx"
    again.parent.mkdir()
    assert quantize_file_streaming(ref, again, rec).exact_blocks == []
    drift = np.abs(OnnxDecoder(again).logits(IDS) - want).max()
    print(f"{qtype_name}: kept blocks {np.abs(got - want).max():.2e}, requantized {drift:.2e}")
    if qtype_name == "Q8_0":
        assert drift > 10 * np.abs(got - want).max()


def _q6_k_bytes(rows: int, k: int, seed: int) -> np.ndarray:
    """Random Q6_K rows (gguf cannot write Q6_K): any bytes are a valid block once its fp16
    ``d`` is a finite normal number."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, k // 256, 210), dtype=np.uint8)
    d = (rng.uniform(0.5, 2.0, (rows, k // 256)) * 1e-3).astype(np.float16)
    raw[..., 208:210] = d.view(np.uint8).reshape(rows, k // 256, 2)
    return raw


@pytest.mark.parametrize("qtype_name, block", [("Q5_0", 32), ("Q6_K", 16)])
def test_wider_gguf_types_are_exact_8bit_blocks(qtype_name, block):
    """Q5_0 (a Q4_K_M file's type for rows that are not whole 256-value super-blocks) and
    Q6_K are ``integer * scale`` with no offset: 8-bit MatMulNBits holds them bit for bit
    (Q6_K's sub-blocks of 16 values: block 16), against gguf's own dequantizer."""
    from slmedge.exporter.quantize.gguf_blocks import blocks_from_bytes, supported_type

    qtype = gguf.GGMLQuantizationType[qtype_name]
    n, k = 24, 512
    if qtype_name == "Q5_0":
        m = np.random.default_rng(2).standard_normal((n, k)).astype(np.float32)
        data = gguf.quants.quantize(m, qtype)
    else:
        data = _q6_k_bytes(n, k, 2)
    assert supported_type(qtype_name)
    blocks = blocks_from_bytes(data, qtype_name, k, n)
    assert (blocks.bits, blocks.block_size, blocks.zero_points) == (8, block, None)
    if qtype_name == "Q5_0":  # packed with a Q8_0 part (Gemma's QKV): each part keeps its type
        from slmedge.exporter.quantize.gguf_blocks import concat_blocks

        q8 = blocks_from_bytes(gguf.quants.quantize(m[:8], gguf.GGMLQuantizationType.Q8_0),
                               "Q8_0", k, 8)
        both = concat_blocks([blocks, q8])
        assert (both.source_type, both.part_types) == ("mixed", ("Q5_0", "Q8_0"))
    file_w = gguf.quants.dequantize(data, qtype).reshape(n, k).T
    np.testing.assert_array_equal(dequantize(blocks), file_w)
    x = np.random.default_rng(0).standard_normal((5, k)).astype(np.float32)
    want = x.astype(np.float64) @ file_w.astype(np.float64)
    np.testing.assert_allclose(nbits_logits(blocks, x), want, rtol=1e-5,
                               atol=1e-5 * np.abs(want).max())
    with pytest.raises(ValueError, match=f"{qtype_name} \\[{n} x {k}\\] needs"):
        blocks_from_bytes(np.asarray(data).reshape(-1)[:-1], qtype_name, k, n)


@pytest.mark.parametrize("keep", [True, False, "head4"])
def test_int4_default_keeps_a_wider_sources_blocks(keep, tiny_artifact, tmp_path):
    """The default int4 recipe (HQQ, block 32) on a source whose weights are Q5_0 (more bits
    than int4): with ``keep_source_bits`` (default) every MatMul keeps the file's blocks as
    8-bit MatMulNBits, the logits are the fp32 graph's to fp32 rounding and the report says
    so; without it they are rounded to 4 bits and move."""
    from slmedge.exporter.quantize.gguf_blocks import blocks_from_bytes
    from slmedge.exporter.quantize.graph import analyze
    from slmedge.exporter.quantize.recipe import QuantRecipe
    from slmedge.exporter.quantize.streaming import quantize_file_streaming
    from slmedge.runtimes.sessions.onnx_decoder import OnnxDecoder

    model = onnx.load(str(tiny_artifact("llama") / "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    source_blocks = {}
    for w in analyze(model).weight_matmuls:
        rows = numpy_helper.to_array(inits[w.weight]).T.astype(np.float32)
        blocks = blocks_from_bytes(gguf.quants.quantize(rows, gguf.GGMLQuantizationType.Q5_0),
                                   "Q5_0", w.k, w.n)
        source_blocks[w.module] = blocks
        inits[w.weight].CopyFrom(numpy_helper.from_array(dequantize(blocks), w.weight))
    ref = tmp_path / "ref" / "model.onnx"
    ref.parent.mkdir()
    onnx.save_model(model, str(ref), save_as_external_data=True, location="model.onnx.data")
    if keep == "head4":  # an lm_head precision named by the user is not widened
        rec = QuantRecipe(scheme="int4", accuracy_level=1, lm_head="int4")
    else:
        rec = QuantRecipe(scheme="int4", accuracy_level=1, keep_source_bits=keep)
    assert QuantRecipe(scheme="int4").keep_source_bits
    out = tmp_path / "q" / "model.onnx"
    out.parent.mkdir()
    report = quantize_file_streaming(ref, out, rec, exact=source_blocks.get)
    graph = onnx.load(str(out))
    nodes = [n for n in graph.graph.node if n.op_type == "MatMulNBits"]
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in nodes}
    # the recipe's level 1 is the 4-bit nodes'; 8-bit ones are level 4 (QuantRecipe.level_for)
    assert {(bits[n.name], next(a.i for a in n.attribute if a.name == "accuracy_level"))
            for n in nodes} <= {(4, 1), (8, 4)}
    for node in nodes:  # the weights' own values, in fp32 arithmetic (no int8 activations)
        next(a for a in node.attribute if a.name == "accuracy_level").i = 1
    fp32 = tmp_path / "q-level1.onnx"
    onnx.save_model(graph, str(fp32))
    want = OnnxDecoder(ref).logits(IDS)
    err = np.abs(OnnxDecoder(fp32).logits(IDS) - want).max()
    if keep == "head4":
        assert sorted(bits.values()) == [4] + [8] * (len(bits) - 1)
        assert report.gguf_exact["wider_than_recipe"] == {"int8": len(bits) - 1}
    elif keep:
        assert set(bits.values()) == {8}
        assert len(report.exact_blocks) == len(bits)
        # every body MatMul; the lm_head is int8 by the recipe itself, not widened
        assert report.gguf_exact["wider_than_recipe"] == {"int8": len(bits) - 1}
        assert set(report.weight_precision) == {"int8"}
        np.testing.assert_allclose(err, 0, atol=2e-5 * np.abs(want).max())
    else:
        # the body at int4, the lm_head int8 by the recipe
        assert sorted(bits.values()) == [4] * (len(bits) - 1) + [8]
        assert report.gguf_exact["wider_than_recipe"] == {}
        assert err > 1e-3 * np.abs(want).max()


def test_q4_k_is_4bit_blocks_with_float_zero_points():
    """Q4_K (``d * sc * q - dmin * m`` per sub-block of 32) as MatMulNBits 4-bit, block 32,
    scale ``d * sc`` and float zero point ``dmin * m / (d * sc)``: gguf's own dequantized
    values to fp32 rounding (the zero point's one division), and the kernel computes with
    them; a sub-block of scale 0 with a nonzero min has no such form and is refused."""
    from slmedge.exporter.quantize.gguf_blocks import blocks_from_bytes

    rng = np.random.default_rng(4)
    n, k = 16, 512
    raw = rng.integers(0, 256, (n, k // 256, 144), dtype=np.uint8)
    raw[..., 0:4] = (rng.uniform(0.5, 2.0, (n, k // 256, 2)) * 1e-2).astype(np.float16).view(
        np.uint8).reshape(n, k // 256, 4)
    raw[..., 4:8] |= 1  # sub-blocks 0-3: scale bits 0-5 of bytes 0-3 nonzero
    raw[..., 12:16] |= 1  # sub-blocks 4-7: low scale bits in bytes 8-11
    file_w = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_K).reshape(n, k).T
    blocks = blocks_from_bytes(raw, "Q4_K", k, n)
    assert (blocks.bits, blocks.block_size) == (4, 32)
    assert blocks.zero_points.shape == blocks.scales.shape == (n, k // 32)
    np.testing.assert_allclose(dequantize(blocks), file_w, rtol=0,
                               atol=1e-6 * np.abs(file_w).max())
    x = rng.standard_normal((3, k)).astype(np.float32)
    inits = [numpy_helper.from_array(blocks.packed, "B"),
             numpy_helper.from_array(blocks.scales.reshape(-1), "scales"),
             numpy_helper.from_array(blocks.zero_points.reshape(-1), "zp")]
    node = helper.make_node("MatMulNBits", ["x", "B", "scales", "zp"], ["y"],
                            domain="com.microsoft", **blocks.attributes())
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    got = ort.InferenceSession(model.SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    want = x.astype(np.float64) @ file_w.astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    raw[0, 0, 4:16] = 0
    raw[0, 0, 8] = 1  # sub-block 0: scale 0, min 1
    with pytest.raises(ValueError, match="scale 0 and a nonzero min"):
        blocks_from_bytes(raw, "Q4_K", k, n)


def test_float_zero_point_blocks_are_kept_and_folded(tiny_artifact, tmp_path):
    """A source's 4-bit blocks with float zero points (Q4_K's form) go through the streaming
    quantizer as they are: their scales and zero points stay inline for
    fold_float_zero_points even when the packed weights go to the data file, and the folded
    graph computes the file's values (here HQQ's own blocks of each weight stand in for Q4_K's,
    which gguf cannot write)."""
    from slmedge.exporter.quantize.gguf_blocks import NBitsBlocks
    from slmedge.exporter.quantize.graph import analyze
    from slmedge.exporter.quantize.hqq import hqq_quantize
    from slmedge.exporter.quantize.recipe import QuantRecipe
    from slmedge.exporter.quantize.streaming import quantize_file_streaming
    from slmedge.runtimes.sessions.onnx_decoder import OnnxDecoder

    model = onnx.load(str(tiny_artifact("llama") / "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    source_blocks = {}
    for w in analyze(model).weight_matmuls:
        weight = numpy_helper.to_array(inits[w.weight]).astype(np.float32)  # [K, N]
        packed, scales, zp = hqq_quantize(weight, 4, 32)
        blocks = NBitsBlocks(k=w.k, n=w.n, bits=4, block_size=32,
                             packed=packed.reshape(w.n, w.k // 32, 16),
                             scales=scales.reshape(w.n, -1), zero_points=zp.reshape(w.n, -1),
                             source_type="Q4_K")
        source_blocks[w.module] = blocks
        inits[w.weight].CopyFrom(numpy_helper.from_array(dequantize(blocks), w.weight))
    ref = tmp_path / "ref" / "model.onnx"
    ref.parent.mkdir()
    onnx.save_model(model, str(ref), save_as_external_data=True, location="model.onnx.data")
    out = tmp_path / "q" / "model.onnx"
    out.parent.mkdir()
    rec = QuantRecipe(scheme="int4", lm_head="int4", accuracy_level=1)
    report = quantize_file_streaming(ref, out, rec, exact=source_blocks.get)
    assert report.zero_points == "folded"
    assert report.gguf_exact["by_type"] == {"Q4_K": len(source_blocks)}
    graph = onnx.load(str(out), load_external_data=False).graph
    external = {t.name for t in graph.initializer if t.data_location == TensorProto.EXTERNAL}
    assert any(name.endswith("_Q4") for name in external)  # packed weights in the data file
    # scales of 1024 bytes and more would go there too (the packed gate/up's: 2 x 128 x 4)
    assert max(int(np.prod(t.dims)) * 4 for t in graph.initializer
               if t.name.endswith("_scales")) >= 1024
    want = OnnxDecoder(ref).logits(IDS)
    got = OnnxDecoder(out).logits(IDS)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
