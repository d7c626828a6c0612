"""A tied embedding and lm_head, both int4, store one table (tied_table.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from slmedge.exporter.quantize import weight_only
from slmedge.exporter.quantize.core import quantize_model
from slmedge.exporter.quantize.recipe import QuantRecipe
from slmedge.runtimes.sessions.onnx_decoder import OnnxDecoder

IDS = [3, 17, 42, 5, 99, 12, 7, 64, 21, 88]


def _size(path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


@pytest.fixture(scope="module")
def tied(tiny_artifact):
    import json

    art = tiny_artifact("gemma3_text")
    config = json.loads((art / "config.json").read_text())
    assert config.get("tie_word_embeddings", True), "the fixture must be a tied model"
    return art


def test_a_tied_int4_table_is_stored_once_and_computes_the_same(tied, tmp_path, monkeypatch):
    recipe = QuantRecipe(scheme="int4", symmetric=True, lm_head="int4", embedding="int4")
    shared_out, twice_out = tmp_path / "shared.onnx", tmp_path / "twice.onnx"
    quantize_model(tied / "model.onnx", shared_out, recipe)
    monkeypatch.setattr(weight_only, "share_tied_int4_table", lambda model: [])
    quantize_model(tied / "model.onnx", twice_out, recipe)

    graph = onnx.load(str(shared_out), load_external_data=False).graph
    producer = {o: n for n in graph.node for o in n.output}
    lookup = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    reshape = producer[lookup.input[0]]
    assert reshape.op_type == "Reshape"
    heads = [n for n in graph.node if n.op_type == "MatMulNBits" and n.input[1] == reshape.input[0]]
    assert len(heads) == 1 and lookup.input[2] == heads[0].input[2]  # same bytes, same scales
    assert not any(t.data_type == onnx.TensorProto.INT4 for t in graph.initializer)

    vocab, hidden = 128, 64  # tests/helpers/tiny_models.py
    assert _size(twice_out) - _size(shared_out) >= vocab * hidden // 2  # one 4-bit table less
    a = OnnxDecoder(shared_out).logits(IDS)
    b = OnnxDecoder(twice_out).logits(IDS)
    np.testing.assert_array_equal(a, b)


def test_tables_that_differ_are_not_shared(tied, tmp_path):
    """The default int4 recipe (HQQ: float zero points, folded) rounds the lm_head other than
    the embedding's RTN: the bytes differ, nothing is shared, the lookup keeps its table."""
    out = tmp_path / "hqq.onnx"
    quantize_model(tied / "model.onnx", out,
                   QuantRecipe(scheme="int4", lm_head="int4", embedding="int4"))
    graph = onnx.load(str(out), load_external_data=False).graph
    inits = {t.name for t in graph.initializer}
    lookup = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    assert lookup.input[0] in inits
