"""Large embedding tables (QuantRecipe.large_table, issues 15/16), with the 64M-value
threshold lowered to the tiny models' tables.

- an untied table (llama's, as the 8B's 128256 x 4096) is int8 of its own on both export
  paths, the fp32 graph written or quantized on write: same files, the manifest says int8,
  each looked-up row within half an int8 step of the fp32 table;
- ``large_table_bits=4``: a tied table (gemma3's, as Qwen2.5-0.5B's) and its lm_head are
  one int4 table (RTN, integer zero points or none), the lookup reading the head's bytes:
  its rows are exactly the head's dequantized weights, and the two paths give the same files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper
from test_quant_on_write import assert_identical, both_ways
from test_streaming_quant import external_copy

from slmedge.exporter.quantize import tied_table
from slmedge.exporter.quantize.recipe import QuantRecipe
from slmedge.exporter.quantize.streaming import quantize_file_streaming
from slmedge.runtimes.sessions.onnx_decoder import OnnxDecoder

IDS = list(range(6, 40))


def _export(tiny_dir, out: Path, **options) -> dict:
    from slmedge.exporter.pipeline import ExportConfig, run_export

    run_export(ExportConfig(model=str(tiny_dir("llama")), output=out, quant={"scheme": "int4"},
                            quality={"eval_tokens": 64, "new_tokens": 4}, **options))
    return json.loads((out / "manifest.json").read_text())


def _lookup(model: onnx.ModelProto, gbq: onnx.NodeProto, ids: np.ndarray,
            head: onnx.NodeProto | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The rows ``gbq`` returns for ``ids`` (ORT's kernel), and with ``head`` the head's
    weight as ``MatMulNBits`` dequantizes it (``[K, N]``, through an identity input)."""
    nodes = [n for n in model.graph.node if n.op_type == "Reshape" and n.output[0] in gbq.input]
    nodes.append(gbq)
    outputs = [helper.make_tensor_value_info(gbq.output[0], onnx.TensorProto.FLOAT, None)]
    extra = []
    if head is not None:
        attrs = {x.name: helper.get_attribute_value(x) for x in head.attribute}
        k = attrs["K"]
        nodes.append(helper.make_node("MatMulNBits", ["eye", *head.input[1:]], ["w"],
                                      domain="com.microsoft",
                                      **{n: v for n, v in attrs.items() if n != "accuracy_level"}))
        outputs.append(helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, None))
        extra.append(numpy_helper.from_array(np.eye(k, dtype=np.float32), "eye"))
    used = {i for n in nodes for i in n.input}
    graph = helper.make_graph(
        nodes, "lookup",
        [helper.make_tensor_value_info(gbq.input[1], onnx.TensorProto.INT64, [1, None])],
        outputs, [t for t in model.graph.initializer if t.name in used] + extra)
    sub = helper.make_model(graph, opset_imports=list(model.opset_import),
                            ir_version=model.ir_version)
    session = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {gbq.input[1]: ids[None, :]})
    return got[0][0], (got[1] if head is not None else None)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob("model.onnx*"))


def _weight_bytes(path: Path) -> int:
    return sum(numpy_helper.to_array(t, base_dir=str(path.parent)).nbytes
               for t in onnx.load(str(path), load_external_data=False).graph.initializer)


def test_an_untied_large_table_is_int8_on_both_export_paths(tiny_dir, tiny_artifact, tmp_path,
                                                            monkeypatch):
    """The default int4 export of an untied model whose table is large: written through the
    fp32 graph and quantized on write, the same files; the manifest's result (not its
    recipe, which records what was asked: ``embedding: float``) says int8; the lookup is a
    GatherBlockQuantized whose rows are the fp32 table's within half an int8 step."""
    monkeypatch.setattr(tied_table, "TIED_TABLE_MIN_VALUES", 1)
    written = _export(tiny_dir, tmp_path / "written")
    on_write = _export(tiny_dir, tmp_path / "on-write", verify_session_max_mb=0.01)
    assert on_write["quantization"]["float_graph"].startswith("not written")
    for manifest in (written, on_write):
        q = manifest["quantization"]
        assert q["recipe"]["embedding"] == "float" and q["recipe"]["large_table"] is True
        assert q["embedding"] == "int8", q["embedding"]
        assert q["lm_head"] == "int8"
    assert (tmp_path / "on-write" / "model.onnx").read_bytes() == \
        (tmp_path / "written" / "model.onnx").read_bytes()

    model = onnx.load(str(tmp_path / "on-write" / "model.onnx"))
    gbq = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(gbq) == 1 and not any(n.op_type == "Gather" and n.input[0] == gbq[0].input[0]
                                     for n in model.graph.node)
    attrs = {a.name: helper.get_attribute_value(a) for a in gbq[0].attribute}
    assert attrs["bits"] == 8
    fp32 = onnx.load(str(tiny_artifact("llama") / "model.onnx"))
    gather = next(n for n in fp32.graph.node if n.op_type == "Gather"
                  and any(t.name == n.input[0] for t in fp32.graph.initializer))
    table = numpy_helper.to_array(next(t for t in fp32.graph.initializer
                                       if t.name == gather.input[0]))
    vocab, k = table.shape
    ids = np.array([0, 1, vocab // 2, vocab - 1], np.int64)
    rows, _ = _lookup(model, gbq[0], ids)
    scales = numpy_helper.to_array(next(t for t in model.graph.initializer
                                        if t.name == gbq[0].input[2]))
    step = np.repeat(scales[ids], attrs["block_size"], axis=1)[:, :k]
    error = np.abs(rows - table[ids])
    assert np.all(error <= step / 2 * (1 + 1e-5)), (error / step).max()
    assert error.max() > 0  # quantized, not copied
    # the logits: the int8 table moves them little next to the same int4 model's float table
    off = tmp_path / "off" / "model.onnx"
    off.parent.mkdir()
    quantize_file_streaming(external_copy(tiny_artifact("llama") / "model.onnx", tmp_path / "src"),
                            off, QuantRecipe(scheme="int4", large_table=False))
    got = OnnxDecoder(tmp_path / "on-write" / "model.onnx").logits(IDS)
    want = OnnxDecoder(off).logits(IDS)
    assert 0 < np.abs(got - want).max() < 0.05 * np.abs(want).max()



def _tied_lookup(model: onnx.ModelProto, head: onnx.NodeProto,
                 ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows the lookup reading ``head``'s bytes returns for ``ids`` (its own nodes,
    tied_table._gather_blocks: named ``<gather>/tied_*``), and the head's weight as
    ``MatMulNBits`` dequantizes it (``[K, N]``, through an identity input)."""
    first = next(n for n in model.graph.node
                 if n.op_type == "Gather" and n.input[0] == head.input[1])
    base = first.name[:-len("/tied_blocks")]
    nodes = [n for n in model.graph.node if n.name.startswith(f"{base}/tied_")]
    rows = next(n for n in nodes if n.name == f"{base}/tied_rows").output[0]
    attrs = {x.name: helper.get_attribute_value(x) for x in head.attribute}
    nodes.append(helper.make_node("MatMulNBits", ["eye", *head.input[1:]], ["w"],
                                  domain="com.microsoft",
                                  **{n: v for n, v in attrs.items() if n != "accuracy_level"}))
    used = {i for n in nodes for i in n.input}
    graph = helper.make_graph(
        nodes, "lookup", [helper.make_tensor_value_info(first.input[1], onnx.TensorProto.INT64,
                                                        [1, None])],
        [helper.make_tensor_value_info(rows, onnx.TensorProto.FLOAT, None),
         helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, None)],
        [t for t in model.graph.initializer if t.name in used]
        + [numpy_helper.from_array(np.eye(attrs["K"], dtype=np.float32), "eye")])
    sub = helper.make_model(graph, opset_imports=list(model.opset_import),
                            ir_version=model.ir_version)
    session = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
    got, w = session.run(None, {first.input[1]: ids[None, :]})
    return got[0], w


def _float_table_body(source: Path, tmp_path: Path):
    """The default int4 body with the tied table kept float (``large_table=False``): the
    model, its table lookup, the lm_head reading it and the table as ``[K, V]`` fp32."""
    base = tmp_path / "base" / "model.onnx"
    base.parent.mkdir()
    quantize_file_streaming(source, base, QuantRecipe(scheme="int4", large_table=False))
    model = onnx.load(str(base))
    inits = {t.name: t for t in model.graph.initializer}
    look = next(n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits)
    vocab = inits[look.input[0]].dims[0]
    head = next(n for n in model.graph.node if n.op_type == "MatMulNBits"
                and any(a.name == "N" and a.i == vocab for a in n.attribute))
    return model, look, head, numpy_helper.to_array(inits[look.input[0]]).T.astype(np.float32)

@pytest.mark.parametrize("symmetric", [False, True])
def test_a_large_tied_table_at_4_bits_is_the_lm_heads_int4_table(symmetric, tiny_artifact,
                                                                 tmp_path, monkeypatch):
    """``large_table_bits=4``: the tied lm_head is int4 RTN (integer zero points, or none
    when symmetric) and the lookup reads its bytes, scales and zero points: the rows are
    exactly the head's dequantized weights, the file is smaller than the int8-tied one by
    about half the table, and the logits point as the float-table model's do."""
    monkeypatch.setattr(tied_table, "TIED_TABLE_MIN_VALUES", 1)
    source = external_copy(tiny_artifact("gemma3_text") / "model.onnx", tmp_path / "src")
    paths = {}
    reports = {}
    for name, recipe in {"int4": dict(large_table_bits=4), "int8": {},
                         "float": dict(large_table=False)}.items():
        paths[name] = tmp_path / name / "model.onnx"
        paths[name].parent.mkdir()
        reports[name] = quantize_file_streaming(
            source, paths[name], QuantRecipe(scheme="int4", symmetric=symmetric, **recipe))
    assert reports["int4"].embedding == "int4-tied" and reports["int4"].lm_head == "int4"
    assert reports["int8"].embedding == "int8-tied" and reports["int8"].lm_head == "int8"
    assert reports["float"].embedding == "float"
    model = onnx.load(str(paths["int4"]))
    assert not [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    head = next(n for n in model.graph.node if n.op_type == "MatMulNBits"
                and (n.output[0] == "logits" or "lm_head" in n.name))
    head_attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    assert head_attrs["bits"] == 4
    assert (len(head.input) > 3 and bool(head.input[3])) is not symmetric  # integer zero points
    # the lookup Gathers the head's packed bytes, scales and zero points as stored (no Reshape
    # of them for ONNX Runtime to fold into a private copy) and unpacks the nibbles
    read = {n.input[0] for n in model.graph.node if n.op_type == "Gather"}
    assert {head.input[1], *head.input[2:4]} <= read
    assert tied_table.looks_up_head_bytes(model)
    assert not [n for n in model.graph.node
                if n.op_type == "Reshape" and n.input[0] in set(head.input[1:4])]
    inits = {t.name for t in model.graph.initializer}
    assert not [t for t in inits if t.endswith("/tied_table")]  # no table of its own
    vocab = head_attrs["N"]
    ids = np.array([0, 1, vocab // 2, vocab - 1], np.int64)
    rows, w = _tied_lookup(model, head, ids)
    np.testing.assert_array_equal(rows, w.T[ids])
    table_bytes = vocab * head_attrs["K"]  # the int8 table's values, one byte each
    # (the weights' bytes: at this tiny size the 4-bit lookup's few more nodes and the
    # external data's layout move the files' sizes by as much)
    assert _weight_bytes(paths["int4"]) < _weight_bytes(paths["int8"]) - 0.4 * table_bytes
    # the model still runs and points the same way as with the float table (a tiny random
    # model: 4-bit noise is large next to its small logits, so compare directions)
    got, want = OnnxDecoder(paths["int4"]).logits(IDS), OnnxDecoder(paths["float"]).logits(IDS)
    cosine = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
    assert np.abs(got - want).max() > 0 and cosine.min() > 0.95, cosine.min()


def test_the_int4_tied_table_is_the_same_quantized_on_write(tiny_dir, tmp_path, monkeypatch):
    """The 4-bit tied table through the written fp32 graph (external data, as large exports
    are written) and straight from the checkpoint's lazy weights: the same files."""
    monkeypatch.setattr(tied_table, "TIED_TABLE_MIN_VALUES", 1)
    written, on_write = both_ways(str(tiny_dir("gemma3_text")), tmp_path,
                                  QuantRecipe(scheme="int4", large_table_bits=4), external=True)
    assert_identical(written, on_write)
    ops = [n.op_type for n in onnx.load(str(on_write), load_external_data=False).graph.node]
    assert "GatherBlockQuantized" not in ops and "BitShift" in ops  # 4-bit rows unpacked


def test_an_lm_head_precision_named_by_the_user_is_kept(tiny_artifact, tmp_path, monkeypatch):
    """``large_table_bits=4`` changes only a default: with ``--lm-head int8`` the tied table
    stays the head's int8 table."""
    monkeypatch.setattr(tied_table, "TIED_TABLE_MIN_VALUES", 1)
    source = external_copy(tiny_artifact("gemma3_text") / "model.onnx", tmp_path / "src")
    out = tmp_path / "q" / "model.onnx"
    out.parent.mkdir()
    report = quantize_file_streaming(source, out, QuantRecipe(scheme="int4", lm_head="int8",
                                                              large_table_bits=4))
    assert report.embedding == "int8-tied" and report.lm_head == "int8"


def test_large_table_bits_is_checked():
    with pytest.raises(ValueError, match="large_table_bits must be 4 or 8, got 2"):
        QuantRecipe(scheme="int4", large_table_bits=2)


def test_large_table_bits_flag_reaches_the_recipe_and_its_label():
    """``--large-table-bits 4`` is a CLI flag (it was a config-file field only) and the label
    says the tied table and head go to 4 bits; naming ``--lm-head`` keeps the head's label."""
    import argparse

    from slmedge.tools.cli.quantize import add_quant_flags, quant_fields

    p = argparse.ArgumentParser()
    add_quant_flags(p)
    fields = quant_fields(p.parse_args(["--quant", "int4", "--large-table-bits", "4"]))
    assert fields["quant"]["large_table_bits"] == 4
    recipe = QuantRecipe(**fields["quant"])
    assert recipe.label().endswith("head8tab4")
    assert QuantRecipe(scheme="int4").label().endswith("head8")
    assert QuantRecipe(scheme="int4", large_table_bits=4, lm_head="int8").label().endswith("head8")
    with pytest.raises(SystemExit):
        p.parse_args(["--quant", "int4", "--large-table-bits", "2"])


@pytest.mark.parametrize("frequent", [[], [3, 1, 40, 7]])
def test_a_split_tied_table_reads_int8_and_int4_rows_as_numpy_dequantizes_them(
        frequent, tiny_artifact, tmp_path):
    """``tied_split.split_tied_table``: the frequent tokens' rows 8-bit, the rest 4-bit, in
    the lm_head (two MatMulNBits, logits put back in vocabulary order) and in the lookup
    (a token -> row map, both parts' bytes read as stored, no table of its own). The rows
    looked up are exactly numpy's dequantized rows of each part, and the logits are those
    of the graph with the dequantized table as float weights (the heads at accuracy level 0:
    fp32 activations)."""
    from slmedge.exporter.quantize import tied_split
    from slmedge.exporter.quantize.gptq import dequantize

    source = external_copy(tiny_artifact("gemma3_text") / "model.onnx", tmp_path / "src")
    model, look, head, w = _float_table_body(source, tmp_path)
    vocab = w.shape[1]
    lo = np.setdiff1d(np.arange(vocab), frequent)
    rest = tied_split.quantize_rows(w[:, lo], 4, 16, "rtn")
    want = np.empty_like(w)  # float32 scales, as stored; (j - zero) * scale rounded once
    j, scale, zero = rest
    want[:, lo] = dequantize(j, scale.astype(np.float32), zero, 16)
    if frequent:
        j, scale, zero = tied_split.quantize_rows(w[:, frequent], 8, 16)
        want[:, frequent] = dequantize(j, scale.astype(np.float32), zero, 16)
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    counts = tied_split.split_tied_table(model, head.name, look.name, w, frequent, rest, 16)
    assert counts == {"int8_rows": len(frequent), "int4_rows": vocab - len(frequent)}
    heads = [n for n in model.graph.node if n.op_type == "MatMulNBits"
             and n.input[0] == head.input[0]]
    assert sorted(helper.get_attribute_value(a) for n in heads for a in n.attribute
                  if a.name == "bits") == ([4, 8] if frequent else [4])
    assert look.input[0] not in {t.name for t in model.graph.initializer}  # no table of its own
    for n in heads:  # fp32 activations: the reference's float MatMul computes the same
        next(a for a in n.attribute if a.name == "accuracy_level").i = 0
    # the reference: the dequantized table as the float lookup table and head weight
    ref_inits = {t.name: t for t in reference.graph.initializer}
    ref_inits[look.input[0]].CopyFrom(numpy_helper.from_array(
        np.ascontiguousarray(want.T.astype(np.float32)), look.input[0]))
    ref_head = next(n for n in reference.graph.node if n.name == head.name)
    reference.graph.initializer.append(numpy_helper.from_array(want.astype(np.float32), "w_deq"))
    i = list(reference.graph.node).index(ref_head)
    reference.graph.node.remove(ref_head)
    reference.graph.node.insert(i, helper.make_node("MatMul", [head.input[0], "w_deq"],
                                                    list(head.output), name=head.name))
    paths = {}
    for name, m in (("split", model), ("reference", reference)):
        value = helper.make_tensor_value_info(look.output[0], onnx.TensorProto.FLOAT, None)
        m.graph.output.append(value)
        paths[name] = tmp_path / name / "model.onnx"
        paths[name].parent.mkdir()
        onnx.save_model(m, str(paths[name]), save_as_external_data=True, location="model.onnx.data")
    ids = np.array([0, *frequent, 2, vocab // 2, vocab - 1, *frequent[:2]], np.int64)
    got = {}
    for name, path in paths.items():
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = {}
        for i in session.get_inputs():
            if i.name == "input_ids":
                feeds[i.name] = ids[None, :]
            elif i.name == "attention_mask":
                feeds[i.name] = np.ones((1, len(ids)), np.int64)
            elif i.name == "position_ids":
                feeds[i.name] = np.arange(len(ids), dtype=np.int64)[None, :]
            else:  # empty past
                shape = [d if isinstance(d, int) else 0 if "past" in str(d) or "seq" in str(d)
                         else 1 for d in i.shape]
                feeds[i.name] = np.zeros(shape, np.float32 if "float" in i.type else np.int64)
        got[name] = session.run(None, feeds)
    np.testing.assert_array_equal(got["split"][-1][0], want.T[ids])
    np.testing.assert_array_equal(got["reference"][-1][0], want.T[ids])
    np.testing.assert_allclose(got["split"][0], got["reference"][0], rtol=1e-4, atol=1e-4)


def _split_parts(model: onnx.ModelProto) -> dict:
    """The split head's and lookup's tensors by role: the two MatMulNBits' bytes, scales and
    zero points (by bits), and the lookup's token -> row map."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type == "MatMulNBits" and (".frequent" in n.name or ".rest" in n.name):
            bits = next(a.i for a in n.attribute if a.name == "bits")
            out.update({f"{bits}.{i}": inits[x] for i, x in enumerate(n.input[1:4])})
    position = [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits
                and inits[n.input[0]].dtype == np.int32 and inits[n.input[0]].ndim == 1]
    out["position"] = inits[position[0].input[0]]
    return out


def test_the_split_tied_table_is_wired_into_the_streaming_quantizer(tiny_artifact, tmp_path,
                                                                    monkeypatch):
    """``large_table_int8_tokens``: the streaming quantizer writes the split table
    (tied_split.py) itself: the calibration text's most frequent tokens' rows 8-bit, the rest
    4-bit GPTQ on the lm_head input's Hessian from the fp32 graph. Its head and lookup are
    byte for byte those of ``split_tied_table`` applied in memory to the same body with the
    same tokens and Hessian, the logits equal, and the manifest's report says so."""
    from slmedge.exporter.quantize import tied_split
    from slmedge.exporter.quantize.calibration import KVCacheCalibrationReader
    from slmedge.exporter.quantize.core import _tokens_for_calibration
    from slmedge.exporter.quantize.gptq import collect_hessians
    from slmedge.exporter.quantize.head_split import frequent_tokens, group_size

    monkeypatch.setattr(tied_table, "TIED_TABLE_MIN_VALUES", 1)
    artifact = tiny_artifact("gemma3_text")
    source = external_copy(artifact / "model.onnx", tmp_path / "src")
    for f in artifact.iterdir():  # the tokenizer, for the calibration text
        if f.name.startswith(("tokenizer", "special_tokens")) or f.name.endswith(".model"):
            (source.parent / f.name).write_bytes(f.read_bytes())
    recipe = QuantRecipe(scheme="int4", large_table_bits=4, large_table_int8_tokens=24)
    assert recipe.label().endswith("head8tab4s24")
    wired = tmp_path / "wired" / "model.onnx"
    wired.parent.mkdir()
    report = quantize_file_streaming(source, wired, recipe)
    split = report.to_dict()["large_table_split"]
    assert split["int4_rounding"] == "gptq" and split["hessian"].startswith("fp32 graph")
    assert report.lm_head == "int4+int8" and report.embedding == "int4+int8-tied"

    # the in-memory path: the float-table body, split by tied_split with the same inputs
    model, look, head, w = _float_table_body(source, tmp_path)
    vocab, k = w.shape[1], w.shape[0]
    ids = _tokens_for_calibration(source.parent, recipe.calibration, None)
    frequent = frequent_tokens(ids, 24, vocab, group_size(vocab, 24))
    assert split["int8_rows"] == len(frequent) > 0
    assert split["int4_rows"] == vocab - len(frequent)
    reader = KVCacheCalibrationReader(source, ids, recipe.calibration, threads=2)
    hessian = collect_hessians(source, {head.input[0]: k}, reader.samples)[head.input[0]]
    hi = np.zeros(vocab, bool)
    hi[frequent] = True
    rest = tied_split.quantize_rows(w[:, ~hi], 4, recipe.block_size, "gptq", hessian)
    tied_split.split_tied_table(model, head.name, look.name, w, frequent, rest,
                                recipe.block_size)
    memory = tmp_path / "memory" / "model.onnx"
    memory.parent.mkdir()
    onnx.save_model(model, str(memory), save_as_external_data=True, location="model.onnx.data")
    got, want = _split_parts(onnx.load(str(wired))), _split_parts(onnx.load(str(memory)))
    assert sorted(got) == sorted(want) and len(got) == 7  # 8-bit and 4-bit B, scales, zp; map
    for name in got:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    np.testing.assert_array_equal(OnnxDecoder(wired).logits(IDS), OnnxDecoder(memory).logits(IDS))


def test_the_split_tied_table_flag_and_its_checks():
    """``--large-table-int8-tokens N`` reaches the recipe; without ``large_table_bits`` 4 (or
    with an lm_head precision named) the recipe says what it needs."""
    import argparse

    from slmedge.tools.cli.quantize import add_quant_flags, quant_fields

    p = argparse.ArgumentParser()
    add_quant_flags(p)
    fields = quant_fields(p.parse_args(["--quant", "int4", "--large-table-bits", "4",
                                        "--large-table-int8-tokens", "8192"]))
    assert fields["quant"]["large_table_int8_tokens"] == 8192
    assert QuantRecipe(**fields["quant"]).label().endswith("head8tab4s8192")
    for bad in (dict(large_table_int8_tokens=8192),
                dict(large_table_bits=4, lm_head="int8", large_table_int8_tokens=8192)):
        with pytest.raises(ValueError, match="large_table_int8_tokens splits the 4-bit large "
                           "tied table: it needs scheme int4, large_table_bits 4"):
            QuantRecipe(scheme="int4", **bad)
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        QuantRecipe(scheme="int4", large_table_bits=4, large_table_int8_tokens=-1)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_a_large_tables_columns_are_rounded_a_slice_at_a_time_as_all_at_once(method):
    """``tied_split.quantize_columns`` (the streamed split's rounding, a slice of columns per
    call to bound memory) gives what one ``quantize_rows`` call on the selected columns gives:
    each column's rounding depends on its values and the shared Hessian only."""
    from slmedge.exporter.quantize import tied_split

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 300)).astype(np.float32)
    x = rng.standard_normal((500, 64))
    hessian = x.T @ x / len(x)
    columns = np.flatnonzero(rng.random(300) < 0.7)
    whole = tied_split.quantize_rows(np.ascontiguousarray(w[:, columns]), 4, 32, method, hessian)
    sliced = tied_split.quantize_columns(w, columns, 4, 32, method, hessian, per_call=50)
    for a, b in zip(whole, sliced, strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_split_tied_table_on_write_rounds_by_rtn_and_needs_a_tokenizer(tiny_dir, tmp_path,
                                                                            monkeypatch):
    """Quantizing on write there is no fp32 graph to run for the lm_head input's Hessian: the
    split's 4-bit rows are RTN and the report says why; the frequent tokens still come from
    the calibration text, so a graph with no tokenizer directory is refused by name."""
    from test_quant_on_write import fp32_graph

    from slmedge.exporter.onnx.graph_writer import graph_without_weights
    from slmedge.runtimes.errors import UnsupportedOp

    monkeypatch.setattr(tied_table, "TIED_TABLE_MIN_VALUES", 1)
    model_dir = tiny_dir("gemma3_text")
    graph, _, _ = fp32_graph(str(model_dir), tmp_path, external=True)
    recipe = QuantRecipe(scheme="int4", large_table_bits=4, large_table_int8_tokens=24)
    out = tmp_path / "on_write" / "model.onnx"
    out.parent.mkdir()
    with pytest.raises(UnsupportedOp, match="large_table_int8_tokens.*tokenizer directory"):
        quantize_file_streaming(None, out, recipe, graph=graph_without_weights(graph))
    report = quantize_file_streaming(None, out, recipe, graph=graph_without_weights(graph),
                                     tokenizer_dir=model_dir)
    split = report.to_dict()["large_table_split"]
    assert split["int4_rounding"] == "rtn" and split["hessian"].startswith("none (quantized on")
    assert split["int8_rows"] > 0 and report.lm_head == "int4+int8"
    assert np.isfinite(OnnxDecoder(out).logits(IDS)).all()


def test_the_split_tied_table_reaches_the_manifest_through_export(tiny_dir, tmp_path,
                                                                  monkeypatch):
    """``slmedge export --quant int4 --large-table-bits 4 --large-table-int8-tokens N``: the
    exported artifact's manifest names the split (label, rows, GPTQ from the fp32 graph)."""
    from slmedge.exporter.pipeline import ExportConfig, run_export

    monkeypatch.setattr(tied_table, "TIED_TABLE_MIN_VALUES", 1)
    out = tmp_path / "split"
    run_export(ExportConfig(model=str(tiny_dir("gemma3_text")), output=out,
                            quant={"scheme": "int4", "large_table_bits": 4,
                                   "large_table_int8_tokens": 24},
                            quality={"eval_tokens": 64, "new_tokens": 4,
                                     "max_ppl_increase": 1000, "max_kl_mean": 100,
                                     "min_top1_agreement": 0}))
    q = json.loads((out / "manifest.json").read_text())["quantization"]
    assert q["label"].endswith("head8tab4s24")
    assert q["lm_head"] == "int4+int8" and q["embedding"] == "int4+int8-tied"
    split = q["large_table_split"]
    assert split["int8_rows"] > 0 and split["int4_rounding"] == "gptq"
    assert split["hessian"].startswith("fp32 graph")
