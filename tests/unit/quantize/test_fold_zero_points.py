"""Folding MatMulNBits' float zero points into ``blocksum(x) @ M`` keeps the numerics."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from slmedge.exporter.quantize.fold_zero_points import (
    MAX_CODE_ERROR, FoldReport, fold_float_zero_points, fold_zero_points, materialize_corrections,
)


def _nbits_model(k, n, block, *, zp_kind="float", bias=False, seed=0):
    """One MatMulNBits (4 bits) with random weights; ``zp_kind`` float, uint8 or none."""
    rng = np.random.default_rng(seed)
    blocks = -(-k // block)
    q = rng.integers(0, 16, size=(n, blocks * block), dtype=np.uint8)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(n, blocks, block // 2)
    scales = rng.uniform(0.01, 0.1, size=n * blocks).astype(np.float32)
    inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "scales")]
    inputs = ["x", "B", "scales"]
    if zp_kind == "float":
        inits.append(numpy_helper.from_array(
            rng.uniform(0, 15, size=n * blocks).astype(np.float32), "zp"))
        inputs.append("zp")
    elif zp_kind == "uint8":
        zq = rng.integers(0, 16, size=(n, blocks + blocks % 2), dtype=np.uint8)
        inits.append(numpy_helper.from_array((zq[:, 0::2] | (zq[:, 1::2] << 4)).reshape(-1), "zp"))
        inputs.append("zp")
    if bias:
        inits.append(numpy_helper.from_array(rng.normal(size=n).astype(np.float32), "bias"))
        inputs += [""] * (5 - len(inputs)) + ["bias"]
    node = helper.make_node("MatMulNBits", inputs, ["y"], name="proj", domain="com.microsoft",
                            K=k, N=n, bits=4, block_size=block)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],  # any rank
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)])


def _run(model, x, optimized=None):
    opts = ort.SessionOptions()
    if optimized is not None:  # the graph ONNX Runtime runs, after its own optimizations
        opts.optimized_model_filepath = str(optimized)
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("k,n,block,bias", [(64, 32, 32, False), (128, 32, 16, False),
                                            (64, 32, 32, True)])
def test_folded_graph_computes_the_same(k, n, block, bias):
    model = _nbits_model(k, n, block, bias=bias)
    x = np.random.default_rng(1).normal(size=(2, 5, k)).astype(np.float32)
    want = _run(model, x)
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    assert fold_float_zero_points(folded) == 1
    nbits = [nd for nd in folded.graph.node if nd.op_type == "MatMulNBits"]
    assert len(nbits) == 1 and (len(nbits[0].input) < 4 or not nbits[0].input[3])
    assert bias == (len(nbits[0].input) == 6 and nbits[0].input[5] == "bias")
    assert "zp" not in {t.name for t in folded.graph.initializer}
    got = _run(folded, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # also for 2-D input: the blocksum keeps whatever leading dims x has
    np.testing.assert_allclose(_run(folded, x[0]), _run(model, x[0]), rtol=1e-4,
                               atol=1e-4 * np.abs(want).max())


def _copy(model):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _dequantized(model):
    """[K, N] weights of the single 4-bit node with float zero points (the reference)."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    a = {x.name: helper.get_attribute_value(x) for x in model.graph.node[0].attribute}
    n, k, block = a["N"], a["K"], a["block_size"]
    b = inits["B"].reshape(n, -1)
    q = np.stack([b & 15, b >> 4], axis=-1).reshape(n, k // block, block).astype(np.float64)
    s = inits["scales"].astype(np.float64).reshape(n, -1, 1)
    return ((q - inits["zp"].astype(np.float64).reshape(n, -1, 1)) * s).reshape(n, k).T


@pytest.mark.parametrize("bits,n", [(8, 48), (12, 48), (12, 15)])
def test_compact_correction_rounds_zero_points_within_the_bound(tmp_path, bits, n):
    """8- / 12-bit codes: the same result as the fp32 M up to zero points rounded by <= the
    reported error (in steps), checked against the weights computed here in float64;
    ONNX Runtime folds the rebuilding ops away at load (the decode graph is the fp32 one's);
    materialize_corrections gives back an fp32 M that computes the same. n=15 with 3 blocks:
    an odd count of 12-bit codes (the low nibbles' padding)."""
    k, block = (128, 32) if n % 2 == 0 else (96, 32)
    model = _nbits_model(k, n, block)
    x = np.random.default_rng(3).normal(size=(1, 4, k)).astype(np.float32)
    exact = _copy(model)
    assert fold_zero_points(exact).compact == 0
    compact = _copy(model)
    report = fold_zero_points(compact, code_bits=bits)
    # random zero points in [0, 15): a span of 15 steps on 2**bits - 1 codes rounds by less
    # than 15 / (2 * (2**bits - 1))
    assert (report.folded, report.compact, report.label) == (1, 1, f"folded-u{bits}")
    assert 0 < report.max_zero_point_error <= 15 / (2 * (2**bits - 1)) + 1e-9
    inits = {t.name: t for t in compact.graph.initializer}
    codes = [t for name, t in inits.items() if name.endswith("/codes")]
    assert len(codes) == 1 and codes[0].data_type == TensorProto.UINT8
    assert list(codes[0].dims) == [n, k // block]
    stored = sum(numpy_helper.to_array(t).nbytes for name, t in inits.items()
                 if "/zp_fold/correction/" in name)
    assert stored <= n * (k // block) * bits / 8 + 128  # bits / 8 bytes per block + scalars
    assert not any(t.data_type == TensorProto.FLOAT and list(t.dims) == [k // block, n]
                   for t in inits.values())  # no fp32 M in the file
    # the difference to the exact result is x @ (rounding of zp, at most e steps per block)
    w = _dequantized(model)
    scales = numpy_helper.to_array(inits["scales"]).astype(np.float64).reshape(n, -1)
    bound = np.abs(x.astype(np.float64)).reshape(-1, k // block, block).sum(-1) @ (
        scales.T * report.max_zero_point_error)
    got = _run(compact, x, optimized=tmp_path / "opt.onnx")
    want = x.astype(np.float64) @ w
    tol = 1e-4 * np.abs(want).max()
    assert (np.abs(got - want) <= bound.reshape(got.shape) + tol).all()
    assert np.abs(got - _run(exact, x)).max() > 1e-7  # rounded: not the fp32 M's result
    ran = onnx.load(str(tmp_path / "opt.onnx"))
    assert sorted(nd.op_type for nd in ran.graph.node) == ["Add", "MatMul", "MatMul",
                                                           "MatMulNBits"]
    plain = _copy(compact)
    assert materialize_corrections(plain) == 1
    assert sorted(nd.op_type for nd in plain.graph.node) == ["Add", "MatMul", "MatMul",
                                                             "MatMulNBits"]
    assert not any(t.name.endswith("/codes") for t in plain.graph.initializer)
    np.testing.assert_allclose(_run(plain, x), got, rtol=1e-5, atol=1e-6 * np.abs(got).max())


def test_fp16_correction_is_one_cast_folded_at_load(tmp_path):
    """The default storage: M as fp16 behind one Cast (2 bytes per block). The zero points
    move by M's fp16 rounding, at most |8 - zp| * 2**-11 <= 0.004 step here, as reported; ONNX
    Runtime folds the Cast at load (the decode graph is the fp32 one's) and
    materialize_corrections gives back the fp32 M the session runs."""
    k, n, block = 128, 48, 32
    model = _nbits_model(k, n, block)
    x = np.random.default_rng(5).normal(size=(1, 4, k)).astype(np.float32)
    half = _copy(model)
    report = fold_zero_points(half, code_bits=16)
    assert (report.folded, report.compact, report.label) == (1, 1, "folded-f16")
    assert 0 < report.max_zero_point_error <= 8 * 2.0**-11 + 1e-9
    inits = {t.name: t for t in half.graph.initializer}
    stored = [t for name, t in inits.items() if "/zp_fold/correction/" in name]
    assert [(t.data_type, list(t.dims)) for t in stored] == [(TensorProto.FLOAT16,
                                                              [k // block, n])]
    assert not any(t.data_type == TensorProto.FLOAT and list(t.dims) == [k // block, n]
                   for t in inits.values())  # no fp32 M in the file
    # the reported error bounds the difference to the float64 weights
    scales = numpy_helper.to_array(inits["scales"]).astype(np.float64).reshape(n, -1)
    bound = np.abs(x.astype(np.float64)).reshape(-1, k // block, block).sum(-1) @ (
        scales.T * report.max_zero_point_error)
    got = _run(half, x, optimized=tmp_path / "opt.onnx")
    want = x.astype(np.float64) @ _dequantized(model)
    assert (np.abs(got - want) <= bound.reshape(got.shape) + 1e-4 * np.abs(want).max()).all()
    exact = _copy(model)
    fold_zero_points(exact)
    assert np.abs(got - _run(exact, x)).max() > 1e-7  # rounded: not the fp32 M's result
    ran = onnx.load(str(tmp_path / "opt.onnx"))
    assert sorted(nd.op_type for nd in ran.graph.node) == ["Add", "MatMul", "MatMul",
                                                           "MatMulNBits"]
    plain = _copy(half)
    assert materialize_corrections(plain) == 1
    assert not any(t.data_type == TensorProto.FLOAT16 for t in plain.graph.initializer)
    np.testing.assert_array_equal(_run(plain, x), got)


@pytest.mark.parametrize("level,k,n", [(1, 128, 48), (4, 128, 48), (1, 608, 20), (4, 608, 20)])
def test_int8_correction_is_one_8bit_matmulnbits(tmp_path, level, k, n):
    """``code_bits=-level``: ``blocksum(x) @ M`` as one 8-bit MatMulNBits, ``M^T`` int8 in
    blocks of 16 along K/32 (k=608: 19 blocks, the last block of M padded), ~1.25 bytes per
    block (int8 + an fp32 scale per 16), kept int8 by ONNX Runtime (no fp32 M to fold). The
    result is the fp32 M graph's within the reported zero-point error (in steps, bounding
    the change of each block's weights); level 4 also rounds the block sums to int8 per 16,
    which moves the correction by at most ``blockmax(|blocksum|) / 254 @ |M|``."""
    model = _nbits_model(k, n, 32)
    x = np.random.default_rng(7).normal(size=(1, 4, k)).astype(np.float32)
    blocks = k // 32
    q8 = _copy(model)
    report = fold_zero_points(q8, code_bits=-level)
    assert (report.folded, report.compact) == (1, 1)
    assert report.label == ("folded-i8" if level == 1 else "folded-i8a8")
    # a block's M moves by <= max|M| over its 16 / 254: in steps of a block with a 10x
    # smaller scale (random scales in [0.01, 0.1]) <= 15 * 10 / 254
    assert 0 < report.max_zero_point_error <= 15 * 10 / 254
    inits = {t.name: t for t in q8.graph.initializer}
    stored = sum(numpy_helper.to_array(t).nbytes for name, t in inits.items()
                 if "/zp_fold/correction/" in name)
    assert stored == n * -(-blocks // 16) * (16 + 4)  # int8 codes (padded) + fp32 scales
    assert not any(t.data_type == TensorProto.FLOAT and list(t.dims) == [blocks, n]
                   for t in inits.values())  # no fp32 M
    nbits = sorted((dict((a.name, helper.get_attribute_value(a)) for a in nd.attribute)["bits"],
                    nd.name) for nd in q8.graph.node if nd.op_type == "MatMulNBits")
    assert [b for b, _ in nbits] == [4, 8]
    got = _run(q8, x, optimized=tmp_path / "opt.onnx")
    ran = onnx.load(str(tmp_path / "opt.onnx"))
    assert sorted(nd.op_type for nd in ran.graph.node) == ["Add", "MatMul", "MatMulNBits",
                                                           "MatMulNBits"]
    exact = _copy(model)
    fold_zero_points(exact)
    want = _run(exact, x)
    sums = np.abs(x.astype(np.float64)).reshape(-1, blocks, 32).sum(-1)
    scales = numpy_helper.to_array(inits["scales"]).astype(np.float64).reshape(n, -1)
    bound = sums @ (scales.T * report.max_zero_point_error)
    if level == 4:
        zp = next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "zp")
        m = np.abs(scales * (8 - zp.astype(np.float64).reshape(n, -1))).T  # |M| [B, N]
        bsum = np.abs(x.astype(np.float64).reshape(-1, blocks, 32).sum(-1))
        pad = np.zeros((bsum.shape[0], -(-blocks // 16) * 16))
        pad[:, :blocks] = bsum
        blockmax = np.repeat(pad.reshape(len(pad), -1, 16).max(-1), 16, axis=1)[:, :blocks]
        bound = bound + (blockmax / 254) @ m
    diff = np.abs(got - want).reshape(-1, n)
    assert (diff <= bound + 1e-5 * np.abs(want).max()).all()
    assert diff.max() > 1e-6  # rounded: not the fp32 M's result


def test_int8_rewrite_of_a_written_graph_matches_the_fold():
    """corrections_as_int8 (benchmarks: an artifact already written) gives the graph that
    ``code_bits=-level`` writes, from its fp16 M (rounded once more: within 1e-3)."""
    from slmedge.exporter.quantize.fold_zero_points import corrections_as_int8

    model = _nbits_model(128, 48, 32)
    x = np.random.default_rng(8).normal(size=(1, 3, 128)).astype(np.float32)
    direct, half = _copy(model), _copy(model)
    fold_zero_points(direct, code_bits=-4)
    fold_zero_points(half, code_bits=16)
    assert corrections_as_int8(half, 4) == 1
    assert sorted(nd.op_type for nd in half.graph.node) == sorted(
        nd.op_type for nd in direct.graph.node)
    want = _run(direct, x)
    np.testing.assert_allclose(_run(half, x), want, rtol=0, atol=1e-3 * np.abs(want).max())


def test_fp16_keeps_fp32_where_asked_or_out_of_range():
    """keep_exact (a source's own Q4_K blocks) and an M beyond fp16's range keep fp32 M."""
    model = _nbits_model(64, 16, 32)
    kept = _copy(model)
    assert fold_zero_points(kept, code_bits=16, keep_exact={"proj"}) == FoldReport(1, 0, 0.0, 16)
    huge = _copy(model)
    sc = next(t for t in huge.graph.initializer if t.name == "scales")
    sc.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(sc) * 1e6, "scales"))
    report = fold_zero_points(huge, code_bits=16)
    assert (report.compact, report.label) == (0, "folded")
    assert any(t.data_type == TensorProto.FLOAT and t.name.endswith("/zp_fold/correction")
               for t in huge.graph.initializer)


def test_compact_keeps_fp32_where_asked_or_too_coarse():
    """keep_exact names a node that keeps fp32 M; a zero-point span over 255 * 2 *
    MAX_CODE_ERROR steps (one outlier block) keeps it too, rather than round all its
    blocks by more than MAX_CODE_ERROR."""
    model = _nbits_model(64, 16, 32)
    kept = _copy(model)
    assert fold_zero_points(kept, code_bits=8, keep_exact={"proj"}) == FoldReport(1, 0, 0.0, 8)
    assert fold_zero_points(kept).label is None  # nothing left to fold
    wide = _copy(model)
    zp = next(t for t in wide.graph.initializer if t.name == "zp")
    values = numpy_helper.to_array(zp).copy()
    values[0] = 255 * 2 * MAX_CODE_ERROR + 20.0
    zp.CopyFrom(numpy_helper.from_array(values, "zp"))
    report = fold_zero_points(wide, code_bits=8)
    assert (report.folded, report.compact, report.label) == (1, 0, "folded")
    x = np.random.default_rng(4).normal(size=(1, 2, 64)).astype(np.float32)
    ref = _copy(model)
    ref.graph.initializer.remove(next(t for t in ref.graph.initializer if t.name == "zp"))
    ref.graph.initializer.append(numpy_helper.from_array(values, "zp"))
    want = _run(ref, x)
    np.testing.assert_allclose(_run(wide, x), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_default_zero_point_is_eight():
    """The fold relies on MatMulNBits without zero_points meaning q - 8 (4 bits)."""
    model = _nbits_model(64, 8, 32, zp_kind="none")
    x = np.random.default_rng(2).normal(size=(1, 3, 64)).astype(np.float32)
    b = numpy_helper.to_array(model.graph.initializer[0]).reshape(8, -1)
    q = np.stack([b & 15, b >> 4], axis=-1).reshape(8, 2, 32).astype(np.float32)
    s = numpy_helper.to_array(model.graph.initializer[1]).reshape(8, 2, 1)
    w = ((q - 8.0) * s).reshape(8, 64).T
    np.testing.assert_allclose(_run(model, x), x @ w, rtol=1e-4, atol=1e-5)


# a K that is not a multiple of the block is folded (test_fold_padded_block.py)
@pytest.mark.parametrize("k,block,zp_kind", [(64, 32, "uint8"), (48, 32, "uint8")])
def test_integer_zero_points_are_left_alone(k, block, zp_kind):
    model = _nbits_model(k, 16, block, zp_kind=zp_kind)
    before = model.SerializeToString()
    assert fold_float_zero_points(model) == 0
    assert model.SerializeToString() == before


@pytest.mark.parametrize("storage", ["float32", "float16", "uint12", "int8-a8"])
def test_hqq_int4_of_tiny_llama_is_folded_and_unchanged(tiny_artifact, tmp_path, monkeypatch,
                                                        storage):
    """fp32 M: the logits of the unfolded graph (float zero points) to fp32 rounding. fp16 M
    (the default) and 12-bit codes: the zero points rounded by ~1/300 step, so close but not
    equal."""
    from slmedge.exporter.quantize import core
    from slmedge.exporter.quantize.core import quantize_model
    from slmedge.exporter.quantize.recipe import QuantRecipe
    from slmedge.runtimes.sessions.onnx_decoder import OnnxDecoder

    art = tiny_artifact("llama")
    # fp32 compute: exact (the lm_head float: the int4 scheme's 8-bit nodes are level 4)
    recipe = QuantRecipe(scheme="int4", block_size=32, accuracy_level=1, lm_head="float",
                         zero_point_storage=storage)
    assert recipe.int4_algorithm.value == "hqq"
    assert QuantRecipe(scheme="int4").zero_point_storage.value == "float16"  # the default
    folded, plain = tmp_path / "folded.onnx", tmp_path / "plain.onnx"
    report = quantize_model(art / "model.onnx", folded, recipe, tokenizer_dir=art)
    monkeypatch.setattr(core, "fold_and_say", lambda *_a, **_k: FoldReport())
    quantize_model(art / "model.onnx", plain, recipe, tokenizer_dir=art)
    if storage == "float32":
        assert (report.zero_points, report.zero_point_error) == ("folded", None)
        assert report.label.endswith("-zpf32")
    elif storage == "float16":
        assert report.zero_points == "folded-f16" and not report.label.endswith(("-zpf32",
                                                                                   "-zpu12"))
        assert 0 < report.zero_point_error <= 1 / 128  # |8 - zp| * 2**-11
    elif storage == "uint12":
        assert report.zero_points == "folded-u12" and report.label.endswith("-zpu12")
        assert 0 < report.zero_point_error <= 1 / 256
    else:  # int8 per 16 blocks of a column: reported in steps of the block, up to ~1/3
        assert report.zero_points == "folded-i8a8" and report.label.endswith("-zpq8a8")
        assert 0 < report.zero_point_error < 1

    def float_zps(path):
        m = onnx.load(str(path))
        inits = {t.name: t.data_type for t in m.graph.initializer}
        return [nd.name for nd in m.graph.node if nd.op_type == "MatMulNBits"
                and len(nd.input) > 3 and inits.get(nd.input[3]) == TensorProto.FLOAT]

    assert float_zps(folded) == [] and float_zps(plain)
    ids = list(range(6, 40))
    want = OnnxDecoder(plain).logits(ids)
    got = OnnxDecoder(folded).logits(ids)
    scale = np.abs(want).max()
    if storage == "float32":
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * scale + 1e-5)
    else:
        diff = np.abs(got - want).max() / scale
        # rounded, by a fraction of the 4-bit rounding; int8-a8 (M per 16 blocks and the
        # block sums int8) moved the tiny llama's logits by 0.47% of their largest
        assert 1e-7 < diff < (1e-2 if storage == "int8-a8" else 2e-3), diff
        assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.95
