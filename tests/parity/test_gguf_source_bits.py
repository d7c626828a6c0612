"""``QuantRecipe.keep_source_bits_kinds`` (issue 16): which of a GGUF's wider-than-4-bit
tensors keep their blocks in an int4 export, by weight kind.

A tiny Llama written as Q8_0 (every matrix wider than int4) is exported to fp32, then
quantized to int4 with the file's blocks as ``slmedge export --model X.gguf --quant int4``
does (``GGUFWeights.exact_blocks``): the listed kinds keep their 8-bit blocks, the others are
rounded to 4 bits from the dequantized values with the reason in the manifest's record, a
packed MatMul (GQA's q/k/v, gate/up) keeps them only when all its parts are listed, and the
lm_head (int8 by the recipe) is never touched.
"""

from __future__ import annotations

import onnx
import pytest
import torch
from helpers.gguf_writer import save_tiny_gguf

from slmedge.exporter.sources import gguf as gguf_source
from slmedge.exporter.quantize.recipe import QuantRecipe, WeightKind
from slmedge.exporter.quantize.streaming import quantize_file_streaming
from slmedge.runtimes.sessions.onnx_decoder import OnnxDecoder
from slmedge.tools.cli.app import main

IDS = list(range(6, 40))
LAYERS = 2


@pytest.fixture(scope="module")
def q8_source(tmp_path_factory):
    """(tiny Q8_0 GGUF path, its fp32 artifact, its exact blocks)."""
    d = tmp_path_factory.mktemp("source-bits")
    tiny = save_tiny_gguf("llama", d / "tiny-q8.gguf", weight_type="q8_0")
    fp32 = d / "fp32"
    assert main(["export", "--model", str(tiny.path), "--output", str(fp32),
                 "--eval-tokens", "64"]) == 0
    _, _, _, weights = gguf_source.open_gguf_streamed(tiny.path, torch.float32)
    return tiny.path, fp32, weights


def _tensors(*parts: str) -> set[str]:
    return {f"blk.{i}.{p}.weight" for i in range(LAYERS) for p in parts}


@pytest.mark.parametrize("kinds, kept", [
    (list(WeightKind), _tensors("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                                "ffn_up", "ffn_down")),
    (["o", "down"], _tensors("attn_output", "ffn_down")),
    (["q", "k", "gate", "up"], _tensors("ffn_gate", "ffn_up")),  # v missing: q/k/v rounded
    ([], set()),
])
def test_only_the_listed_kinds_keep_the_files_wider_blocks(kinds, kept, q8_source, tmp_path):
    _, fp32, weights = q8_source
    recipe = QuantRecipe(scheme="int4", keep_source_bits_kinds=kinds)
    out = tmp_path / "model.onnx"
    report = quantize_file_streaming(fp32 / "model.onnx", out, recipe,
                                     exact=weights.exact_blocks)
    record = report.gguf_exact
    assert set(record["names"]) == kept | {"output.weight"}  # the lm_head: int8 by the recipe
    # the layer weights not kept (a rounded packed MatMul names each of its parts)
    assert record["requantized"]["tensors"] == LAYERS * 7 - len(kept)
    if len(kept) < LAYERS * 7:
        reasons = record["requantized"]["reasons"]
        assert all("QuantRecipe.keep_source_bits_kinds" in r and "rounded to 4 bits" in r
                   for r in reasons), reasons
    bits = sorted(next(a.i for a in n.attribute if a.name == "bits")
                  for n in onnx.load(str(out), load_external_data=False).graph.node
                  if n.op_type == "MatMulNBits")
    # per layer 4 MatMuls (q/k/v packed, o, gate/up packed, down) + the lm_head
    packed_kept = sum(1 for group in (("attn_q",), ("attn_output",), ("ffn_gate",), ("ffn_down",))
                      if _tensors(*group) <= kept)
    assert bits == sorted([4] * (4 - packed_kept) * LAYERS + [8] * (packed_kept * LAYERS + 1))
    assert record["wider_than_recipe"] == ({"int8": packed_kept * LAYERS} if packed_kept else {})
    # every kind kept: the fp32 graph's logits (the file's own values; int8 activations at
    # accuracy level 4); a kind rounded to 4 bits moves them
    got = OnnxDecoder(out).logits(IDS)
    want = OnnxDecoder(fp32 / "model.onnx").logits(IDS)
    err = abs(got - want).max() / abs(want).max()
    if len(kept) == LAYERS * 7:
        assert err < 0.05
    else:
        assert err > 0.05


def test_the_rule_names_real_kinds():
    with pytest.raises(ValueError, match="keep_source_bits_kinds"):
        QuantRecipe(scheme="int4", keep_source_bits_kinds=["gate_proj"])


def test_int8_block_size_rounds_the_wider_blocks_again_on_a_coarser_grid(q8_source, tmp_path):
    """``int8_block_size`` 64 on the Q8_0 file (blocks of 32): every 8-bit MatMul (the kept
    wider blocks, symmetric; the int8 lm_head) is block 64, rounded again at 8 bits from the
    file's values (the record says so), so the logits stay the file's to int8 rounding; fewer
    scale bytes than the file's own blocks."""
    _, fp32, weights = q8_source
    sizes = {}
    for block in (None, 64):
        recipe = QuantRecipe(scheme="int4", int8_block_size=block)
        out = tmp_path / f"b{block}" / "model.onnx"
        out.parent.mkdir()
        report = quantize_file_streaming(fp32 / "model.onnx", out, recipe,
                                         exact=weights.exact_blocks)
        sizes[block] = sum(p.stat().st_size for p in out.parent.glob("model.onnx*"))
    nodes = [n for n in onnx.load(str(out), load_external_data=False).graph.node
             if n.op_type == "MatMulNBits"]
    attrs = [{a.name: a.i for a in n.attribute if a.name in ("bits", "block_size")} for n in nodes]
    assert attrs == [{"bits": 8, "block_size": 64}] * (4 * LAYERS + 1)
    # the kept blocks symmetric (no zero points); the lm_head asymmetric as the recipe says
    assert sorted(len(n.input) for n in nodes) == [3] * 4 * LAYERS + [4]
    record = report.gguf_exact
    assert record["tensors"] == 0 and record["wider_than_recipe"] == {"int8": 4 * LAYERS}
    assert record["requantized"]["tensors"] == LAYERS * 7 + 1
    assert ("8-bit blocks of 32 rounded again at 8 bits, block 64 (QuantRecipe.int8_block_size)"
            in record["requantized"]["reasons"])
    got = OnnxDecoder(out).logits(IDS)
    want = OnnxDecoder(fp32 / "model.onnx").logits(IDS)
    assert abs(got - want).max() < 0.05 * abs(want).max()
    assert sizes[64] < sizes[None]
    with pytest.raises(ValueError, match="int8_block_size applies to the int4 scheme"):
        QuantRecipe(scheme="int8", int8_block_size=64)


@pytest.mark.parametrize("large", [False, True])
def test_a_gguf_with_a_large_table_gets_the_coarser_int8_grid_by_default(large, q8_source,
                                                                          tmp_path, monkeypatch):
    """The default recipe: the file's 8-bit blocks are kept as they are (block 32), unless the
    model's table is large (QuantRecipe.large_table's threshold, lowered here for the tiny
    model), where the 8-bit MatMuls take ``SOURCE_INT8_BLOCK`` (lowered to 64 here: the tiny
    rows are 64 wide)."""
    from slmedge.exporter.quantize import recipe as recipe_module
    from slmedge.exporter.quantize import tied_table

    _, fp32, weights = q8_source
    monkeypatch.setattr(recipe_module, "SOURCE_INT8_BLOCK", 64)
    if large:
        monkeypatch.setattr(tied_table, "TIED_TABLE_MIN_VALUES", 1)
    out = tmp_path / "model.onnx"
    report = quantize_file_streaming(fp32 / "model.onnx", out, QuantRecipe(scheme="int4"),
                                     exact=weights.exact_blocks)
    blocks = {next(a.i for a in n.attribute if a.name == "block_size")
              for n in onnx.load(str(out), load_external_data=False).graph.node
              if n.op_type == "MatMulNBits"}
    assert blocks == ({64} if large else {32})
    assert report.gguf_exact["tensors"] == (0 if large else LAYERS * 7 + 1)
    # the same recipe without a source of blocks (an HF checkpoint) is unchanged
    plain = tmp_path / "plain" / "model.onnx"
    plain.parent.mkdir()
    quantize_file_streaming(fp32 / "model.onnx", plain, QuantRecipe(scheme="int4"))
    assert {next(a.i for a in n.attribute if a.name == "block_size")
            for n in onnx.load(str(plain), load_external_data=False).graph.node
            if n.op_type == "MatMulNBits"} == {32}


def test_smollm2_q4_1_default_is_unchanged():
    """SmolLM2-135M's Q4_1 GGUF: no decoder weight has blocks of more than 4 bits (Q4_1 has
    no exact form: the reasons pass through) and its table (49152 x 576, below the large-table
    threshold) is not a large one, so the default int4 quantizes it as before the kinds and
    the automatic int8 grid existed (same blocks, same reasons, int8 head at block 32)."""
    from slmedge.exporter.quantize import tied_table
    from slmedge.exporter.quantize.gguf_blocks import narrow_wider_blocks
    from slmedge.exporter.sources.load import DEFAULT_MODEL, resolve_embedded

    _, _, _, weights = gguf_source.open_gguf_streamed(resolve_embedded(DEFAULT_MODEL),
                                                      torch.float32)
    narrowed = narrow_wider_blocks(weights.exact_blocks, [])  # even no kind kept
    for module in [f"model.layers.{i}.{m}" for i in (0, 29) for m in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]:
        found = weights.exact_blocks(module)
        assert isinstance(found, str) and found.startswith("Q4_1 has no exact"), module
        assert narrowed(module) == found
    head = narrowed("lm_head")
    assert (head.source_type, head.bits, head.block_size) == ("Q8_0", 8, 32)
    assert 49152 * 576 < tied_table.TIED_TABLE_MIN_VALUES
    assert QuantRecipe(scheme="int4").int8_block_for(None) is None
