"""The int8 scheme's block size per weight kind (QuantRecipe.block_sizes, issue 16): the
written graph's MatMulNBits carry the block of their weight's role, in the in-memory and the
streaming quantizer alike, and the manifest's recipe reloads as the same recipe."""

import numpy as np
import onnx
import pytest
from onnx import helper

from slmedge.exporter.quantize.core import quantize_model
from slmedge.exporter.quantize.graph import analyze, fold_weight_transposes, split_gemms
from slmedge.exporter.quantize.pack_matmuls import pack_shared_input_matmuls
from slmedge.exporter.quantize.recipe import INT8_BLOCK_SIZES, BlockKind, QuantRecipe
from slmedge.exporter.quantize.streaming import quantize_file_streaming
from slmedge.runtimes.sessions.onnx_decoder import OnnxDecoder

IDS = list(range(6, 40))


def _roles(fp32_path) -> dict[str, str]:
    """``MatMulNBits name -> role`` (qkv, o, gate_up, down, lm_head) from the fp32 graph as
    the quantizer sees it (q/k/v and gate/up packed into one MatMul each)."""
    model = onnx.load(str(fp32_path))
    split_gemms(model)
    fold_weight_transposes(model)
    pack_shared_input_matmuls(model)
    facts = analyze(model)
    roles = {}
    for w in facts.weight_matmuls:
        role = "lm_head" if w.node == facts.lm_head else "_".join(w.kinds)
        roles[w.node + "_Q8"] = {"q_k_v": "qkv"}.get(role, role)
    return roles


def _blocks(path) -> dict[str, int]:
    model = onnx.load(str(path), load_external_data=False)
    return {n.name: helper.get_attribute_value(next(a for a in n.attribute if a.name == "block_size"))
            for n in model.graph.node if n.op_type == "MatMulNBits"}


#: block 64 for the attention output and the MLP, 32 elsewhere (bench_quant.py's int8-mlpo64)
MLPO64 = {"o": 64, "gate": 64, "up": 64, "down": 64}


@pytest.mark.parametrize("quantize", ["in-memory", "streaming"])
def test_int8_blocks_per_kind_in_the_written_graph(tiny_artifact, tmp_path, quantize):
    art = tiny_artifact("llama")  # fused: GroupQueryAttention reads one packed qkv MatMul
    recipe = QuantRecipe(scheme="int8", block_sizes=MLPO64)
    out = tmp_path / "q.onnx"
    if quantize == "in-memory":
        report = quantize_model(art / "model.onnx", out, recipe, tokenizer_dir=art)
    else:
        report = quantize_file_streaming(art / "model.onnx", out, recipe)
    roles, blocks = _roles(art / "model.onnx"), _blocks(out)
    assert set(blocks) == set(roles)  # every weight MatMul, the lm_head included
    want = {"qkv": 32, "o": 64, "gate_up": 64, "down": 64, "lm_head": 32}
    assert sorted(set(roles.values())) == sorted(want)
    assert {name: blocks[name] for name in roles} == {name: want[r] for name, r in roles.items()}
    assert report.label == "int8-nbits-b32-o_gate_up_down64-head8"
    # the manifest's recipe (model_dump) reloads as the same recipe, blocks included
    dumped = report.recipe
    assert dumped["block_sizes"] == MLPO64
    assert QuantRecipe(**dumped) == recipe
    got = OnnxDecoder(out).logits(IDS)
    want_logits = OnnxDecoder(art / "model.onnx").logits(IDS)
    assert np.isfinite(got).all() and (got.argmax(-1) == want_logits.argmax(-1)).mean() > 0.8


def test_int8_default_blocks(tiny_artifact, tmp_path):
    """The default int8 recipe writes each weight at the block its kind has by default
    (INT8_BLOCK_SIZES, else block_size), and its label names them."""
    art = tiny_artifact("llama")
    recipe = QuantRecipe(scheme="int8")
    assert recipe.block_sizes == INT8_BLOCK_SIZES  # resolved in the recipe, so dumped
    quantize_file_streaming(art / "model.onnx", tmp_path / "d.onnx", recipe)
    roles, blocks = _roles(art / "model.onnx"), _blocks(tmp_path / "d.onnx")
    kinds = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"), "down": ("down",)}
    assert {n: blocks[n] for n in roles} == {
        n: recipe.block_for(kinds.get(r), lm_head=r == "lm_head") for n, r in roles.items()}
    assert recipe.label().startswith("int8-nbits-b32")


def test_explicit_block_size_and_kind_overrides(tiny_artifact, tmp_path):
    art = tiny_artifact("llama")
    roles = _roles(art / "model.onnx")
    # a block_size given explicitly: that block everywhere (the recipe of earlier manifests,
    # which carry block_size and no block_sizes, reloads so)
    uniform = QuantRecipe(scheme="int8", block_size=64)
    assert uniform.block_sizes == {} and uniform.label() == "int8-nbits-b64-head8"
    quantize_file_streaming(art / "model.onnx", tmp_path / "u.onnx", uniform)
    assert set(_blocks(tmp_path / "u.onnx").values()) == {64}
    # kinds named: a packed MatMul takes the smallest block of its parts (gate 16, up 64)
    mixed = QuantRecipe(scheme="int8", block_sizes={"gate": 16, "up": 64, "lm_head": 64})
    assert mixed.label() == "int8-nbits-b32-gate16-up_lm_head64-head8"
    quantize_file_streaming(art / "model.onnx", tmp_path / "m.onnx", mixed)
    blocks = _blocks(tmp_path / "m.onnx")
    want = {"qkv": 32, "o": 32, "gate_up": 16, "down": 32, "lm_head": 64}
    assert {name: blocks[name] for name in roles} == {name: want[r] for name, r in roles.items()}


def test_block_sizes_are_the_int8_nbits_schemes_only():
    with pytest.raises(ValueError, match="block_sizes applies to the int8 scheme's MatMulNBits"):
        QuantRecipe(scheme="int4", block_sizes={"down": 64})
    with pytest.raises(ValueError, match="qoperator"):
        QuantRecipe(scheme="int8", int8_format="qoperator", block_sizes={"down": 64})
    with pytest.raises(ValueError, match=r"block_sizes\[down\] must be one of"):
        QuantRecipe(scheme="int8", block_sizes={"down": 48})
    with pytest.raises(ValueError, match="lm_head"):  # the kinds are named in the error
        QuantRecipe(scheme="int8", block_sizes={"head": 64})
    assert QuantRecipe(scheme="int8", int8_format="qoperator").block_sizes == {}
    assert QuantRecipe(scheme="int4").block_sizes == {}
    assert BlockKind.lm_head.value == "lm_head"
