"""MatMulNBits accuracy level per bits (issue 16): the recipe's level is the 4-bit nodes'; the
int4 scheme's 8-bit nodes (lm_head, kept layers, a split lm_head's frequent rows) are written at
level 4 whatever it says, in the in-memory and the streaming quantizer alike.

Why: ONNX Runtime 1.32 (x86) has a fast 8-bit MatMulNBits kernel only at level 4; at levels 0-3
an 8-bit node is dequantized on every call (one 576 x 1536 node, 2 threads: ~30 us at level 4,
~3 ms at level 1). An ARM profile's level 1 on the int8 lm_head made SmolLM2 decode at ~0.11x.
"""

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from slmedge.exporter.quantize.core import quantize_model
from slmedge.exporter.quantize.recipe import QuantRecipe
from slmedge.exporter.quantize.streaming import quantize_file_streaming
from slmedge.runtimes.sessions.onnx_decoder import OnnxDecoder

IDS = list(range(6, 40))


def _levels(path) -> dict[int, list[int | None]]:
    """bits -> each MatMulNBits node's accuracy_level (None: attribute unset), graph order."""
    out: dict[int, list] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        if node.op_type == "MatMulNBits":
            a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
            out.setdefault(a["bits"], []).append(a.get("accuracy_level"))
    return out


@pytest.mark.parametrize("scheme, level, want", [
    ("int4", 1, (1, 4)), ("int4", 0, (0, 4)), ("int4", 4, (4, 4)), ("int4", 2, (2, 4)),
    ("int8", 1, (1, 1)), ("int8", 4, (4, 4)),  # the int8 scheme's nodes are its own: as asked
])
def test_level_for_bits(scheme, level, want):
    recipe = QuantRecipe(scheme=scheme, accuracy_level=level)
    assert (recipe.level_for(4), recipe.level_for(8)) == want


@pytest.mark.parametrize("level", [1, 0])
@pytest.mark.parametrize("algorithm", ["hqq", "rtn"])
def test_8_bit_nodes_are_level_4_in_both_quantizers(algorithm, level, tiny_artifact, tmp_path):
    """int4 at level 1 (an ARM profile's) or 0 with an int8 lm_head and a kept (int8) layer:
    the 4-bit nodes carry the recipe's level, the 8-bit ones 4; the streaming path writes the
    same graph, bytes and report as the in-memory one."""
    source = tiny_artifact("llama") / "model.onnx"
    recipe = QuantRecipe(scheme="int4", algorithm=algorithm, accuracy_level=level,
                         keep_layers=[0], lm_head="int8")
    mem, streamed = tmp_path / "mem.onnx", tmp_path / "streamed" / "model.onnx"
    streamed.parent.mkdir()
    mem_report = quantize_model(source, mem, recipe)
    report = quantize_file_streaming(source, streamed, recipe)

    levels = _levels(mem)
    assert set(levels) == {4, 8}, levels
    assert set(levels[4]) == {level or None}, levels  # 0: the attribute is not written
    assert set(levels[8]) == {4} and len(levels[8]) >= 2, levels  # kept layer 0 + lm_head
    assert _levels(streamed) == levels
    want = [{"bits": 4, "accuracy_level": level, "nodes": len(levels[4])},
            {"bits": 8, "accuracy_level": 4, "nodes": len(levels[8])}]
    assert mem_report.accuracy_levels == report.accuracy_levels == want
    assert mem_report.to_dict()["accuracy_levels"] == want  # what the manifest records

    a = onnx.load(str(mem))
    b = onnx.load(str(streamed))
    assert [(n.name, n.op_type, sorted((x.name, repr(helper.get_attribute_value(x)))
                                       for x in n.attribute)) for n in a.graph.node] == \
        [(n.name, n.op_type, sorted((x.name, repr(helper.get_attribute_value(x)))
                                    for x in n.attribute)) for n in b.graph.node]
    ta = {t.name: numpy_helper.to_array(t).tobytes() for t in a.graph.initializer}
    tb = {t.name: numpy_helper.to_array(t).tobytes() for t in b.graph.initializer}
    assert ta == tb
    np.testing.assert_array_equal(OnnxDecoder(streamed).logits(IDS), OnnxDecoder(mem).logits(IDS))


def test_int8_scheme_keeps_the_level_asked(tiny_artifact, tmp_path):
    """The int8 scheme's nodes are the scheme's own: an explicit level 1 is written (the rule
    is for the int4 scheme's 8-bit side nodes only)."""
    out = tmp_path / "int8.onnx"
    report = quantize_model(tiny_artifact("llama") / "model.onnx", out,
                            QuantRecipe(scheme="int8", accuracy_level=1))
    levels = _levels(out)
    assert set(levels) == {8} and set(levels[8]) == {1}, levels
    assert report.accuracy_levels == [{"bits": 8, "accuracy_level": 1,
                                       "nodes": len(levels[8])}]


def test_split_lm_head_rows_int8_at_level_4(tiny_artifact, tmp_path):
    """A split lm_head (in-memory path only): its frequent rows are 8-bit at level 4, its other
    rows 4-bit at the recipe's level 1."""
    calib = [int(t) for t in np.random.default_rng(2).integers(0, 24, 400)]
    out = tmp_path / "split.onnx"
    report = quantize_model(tiny_artifact("llama") / "model.onnx", out,
                            QuantRecipe(scheme="int4", lm_head="int4", lm_head_int8_tokens=16,
                                        accuracy_level=1), calibration_ids=calib)
    assert report.lm_head == "int4+int8"
    levels = _levels(out)
    assert levels[8] == [4] and set(levels[4]) == {1}, levels
    assert Counter(d["bits"] for d in report.accuracy_levels) == Counter({4: 1, 8: 1})
