"""A Q4_0 / Q8_0 GGUF exported without requantization (issue 15).

``slmedge export --model X.gguf --quant int4`` on a GGUF whose matrices are Q4_0 writes the
file's own blocks as the ``MatMulNBits`` weights (bits 4, block 32, no zero points), and
``--quant int8`` on Q8_0 likewise (bits 8, block 32): the artifact computes with the file's
weights, so its logits are the dequantized model's to fp32 rounding. The manifest's
``quantization.gguf_exact`` names the tensors kept; a recipe the blocks do not fit (int8 at
block 64 on a Q8_0 file) quantizes again and says why; int4 on a file of more bits keeps the
file's blocks (never fewer bits than the file).
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import onnx
import pytest
import torch
from helpers.gguf_writer import _llama_permute, save_tiny_gguf
from onnx import numpy_helper

from slmedge.exporter.sources import gguf as gguf_source
from slmedge.exporter.quantize.gguf_blocks import blocks_from_gguf, concat_blocks, reorder_columns
from slmedge.runtimes.manifest_schema import Manifest
from slmedge.runtimes.sessions.onnx_decoder import OnnxDecoder
from slmedge.tools.cli.app import main

IDS = list(range(6, 60))
#: the weights MatMulNBits packs side by side, per layer (GQA's packed QKV, gate/up)
GROUPS = (("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up"), ("attn_output",), ("ffn_down",))
QUICK = ["--eval-tokens", "256"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``exported(weight_type, *flags)`` -> (gguf TinyGGUF, artifact dir, manifest), cached."""
    cache = {}

    def make(weight_type: str, *flags: str):
        key = (weight_type, flags)
        if key not in cache:
            d = tmp_path_factory.mktemp(f"gguf-exact-{weight_type}")
            tiny = save_tiny_gguf("llama", d / f"tiny-{weight_type}.gguf", weight_type=weight_type)
            out = d / "artifact"
            code = main(["export", "--model", str(tiny.path), "--output", str(out), *flags, *QUICK])
            assert code == 0
            cache[key] = (tiny, out, json.loads((out / "manifest.json").read_text()))
        return cache[key]

    return make


EXACT = {  # file type -> the CLI flags whose recipe fits its blocks everywhere
    "q4_0": ("--quant", "int4", "--lm-head", "int4", "--accuracy-level", "1"),
    "q8_0": ("--quant", "int8", "--accuracy-level", "1"),
}


def expected_blocks(tiny) -> list[tuple]:
    """The file's own blocks of every MatMul, re-laid out by gguf_blocks, grouped as packed:
    Q/K columns put back in Hugging Face's order (the writer interleaves them as llama.cpp)."""
    reader = gguf.GGUFReader(str(tiny.path))
    tensors = {t.name: t for t in reader.tensors}
    config = tiny.model.config
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}

    def hf_order(name: str):
        blocks = blocks_from_gguf(tensors[name])
        kind = name.split(".")[-2]
        if kind in heads:  # file row j holds HF row perm[j]
            perm = _llama_permute(np.arange(blocks.n).reshape(-1, 1), heads[kind]).reshape(-1)
            blocks = reorder_columns(blocks, np.argsort(perm))
        return blocks

    groups = [(tuple(f"blk.{i}.{p}.weight" for p in g))
              for i in range(config.num_hidden_layers) for g in GROUPS]
    groups.append(("output.weight",))
    return [(g, concat_blocks([hf_order(n) for n in g])) for g in groups]


@pytest.mark.parametrize("weight_type, bits", [("q4_0", 4), ("q8_0", 8)])
def test_matmul_nbits_weights_are_the_files_blocks(weight_type, bits, exported):
    tiny, out, _ = exported(weight_type, *EXACT[weight_type])
    model = onnx.load(str(out / "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    want = expected_blocks(tiny)
    assert len(nodes) == len(want) == 9  # 2 layers x (qkv, gate|up, o, down) + lm_head
    matched = []
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert (attrs["bits"], attrs["block_size"]) == (bits, 32), node.name
        assert len(node.input) == 3, f"{node.name} has zero points: {list(node.input)}"
        packed, scales = (numpy_helper.to_array(inits[i]) for i in node.input[1:3])
        hits = [names for names, b in want
                if b.packed.shape == packed.shape and np.array_equal(b.packed, packed)
                and np.array_equal(b.scales, scales)]
        assert len(hits) == 1, f"{node.name}: matches {hits} of the file's tensors"
        matched.append(hits[0])
    assert sorted(matched) == sorted(names for names, _ in want)


@pytest.mark.parametrize("weight_type", ["q4_0", "q8_0"])
def test_logits_are_the_dequantized_models(weight_type, exported):
    """The reference: transformers' own load of the GGUF (dequantized to fp32), in PyTorch."""
    tiny, out, _ = exported(weight_type, *EXACT[weight_type])
    reference, _, _ = gguf_source.load_gguf(tiny.path, torch.float32)
    with torch.no_grad():
        want = reference(input_ids=torch.tensor([IDS])).logits[0].numpy()
    got = OnnxDecoder(out / "model.onnx").logits(IDS)
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * scale)
    # the file's values differ from the model it was written from by the quantization step:
    # a reference of the original weights would not pass this tolerance
    with torch.no_grad():
        original = tiny.model(input_ids=torch.tensor([IDS])).logits[0].numpy()
    assert np.abs(original - got).max() > 10 * 1e-4 * scale


@pytest.mark.parametrize("weight_type, qtype", [("q4_0", "Q4_0"), ("q8_0", "Q8_0")])
def test_manifest_names_the_exact_tensors(weight_type, qtype, exported):
    tiny, _, manifest = exported(weight_type, *EXACT[weight_type])
    names = [t.name for t in gguf.GGUFReader(str(tiny.path)).tensors
             if len(t.shape) == 2 and t.name != "token_embd.weight"]
    record = manifest["quantization"]["gguf_exact"]
    assert record["tensors"] == len(names) == 15
    assert record["by_type"] == {qtype: 15}
    assert record["names"] == sorted(names)
    assert len(record["nodes"]) == 9
    assert record["requantized"] == {"tensors": 0, "names": [], "reasons": {}}
    assert Manifest.model_validate(manifest).quantization.gguf_exact.tensors == 15


def test_a_recipe_the_blocks_do_not_fit_quantizes_again_and_says_why(exported):
    """int8 at block 64 asked on a Q8_0 file (block 32): every weight is quantized from the
    dequantized weights, and the manifest says why."""
    tiny, out, manifest = exported("q8_0", "--quant", "int8", "--block-size", "64")
    record = manifest["quantization"]["gguf_exact"]
    assert record["names"] == [] and record["tensors"] == 0
    assert record["requantized"]["tensors"] == 15
    assert record["requantized"]["reasons"] == {
        "the file's Q8_0 blocks are 8-bit, block 32; the recipe asks 8-bit, block 64 here: "
        "quantized again": 15}
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    sizes = {next(a.i for a in n.attribute if a.name == "block_size")
             for n in model.graph.node if n.op_type == "MatMulNBits"}
    assert sizes == {64}


def test_int4_never_rounds_below_the_files_bits(exported):
    """The default int4 recipe on a Q8_0 file (QuantRecipe.keep_source_bits): every weight
    keeps the file's 8-bit blocks instead of being rounded to 4 bits, so the artifact
    computes with the file's weights (the dequantized model's logits) and the manifest counts
    the MatMuls above the recipe's bits."""
    tiny, out, manifest = exported("q8_0", "--quant", "int4")
    record = manifest["quantization"]["gguf_exact"]
    assert record["tensors"] == 15 and record["requantized"]["tensors"] == 0
    assert record["wider_than_recipe"] == {"int8": 8}  # the lm_head is int8 by the recipe
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    bits = [next(a.i for a in n.attribute if a.name == "bits")
            for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert bits == [8] * 9
    reference, _, _ = gguf_source.load_gguf(tiny.path, torch.float32)
    with torch.no_grad():
        want = reference(input_ids=torch.tensor([IDS])).logits[0].numpy()
    got = OnnxDecoder(out / "model.onnx").logits(IDS)
    # accuracy level 4 (the default): int8 activations, so not to fp32 rounding
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


def test_exact_blocks_of_a_tied_head_a_float_file_and_a_transposed_layout(tmp_path):
    """``GGUFWeights.exact_blocks`` without an export: a tied head (no ``output.weight``)
    reads ``token_embd``'s blocks; a float file has none to keep; GPT-2's weights, which the
    loader transposes, are refused with the reason (they are quantized again)."""
    from slmedge.exporter.quantize.gguf_blocks import NBitsBlocks, dequantize

    tiny = save_tiny_gguf("gemma3_text", tmp_path / "gemma-q8.gguf", weight_type="q8_0")
    assert tiny.model.config.tie_word_embeddings
    _, _, _, weights = gguf_source.open_gguf_streamed(tiny.path, torch.float32)
    head = weights.exact_blocks("model.lm_head")  # the traced wrapper's scope
    assert isinstance(head, NBitsBlocks) and head.source_name == "token_embd.weight"
    table = weights.read("model.embed_tokens.weight").numpy()
    np.testing.assert_array_equal(dequantize(head), table.T)

    tiny = save_tiny_gguf("llama", tmp_path / "llama-f32.gguf")
    _, _, _, weights = gguf_source.open_gguf_streamed(tiny.path, torch.float32)
    assert weights.exact_blocks("model.model.layers.0.self_attn.q_proj") is None

    tiny = save_tiny_gguf("gpt2", tmp_path / "gpt2-q8.gguf", weight_type="q8_0")
    _, _, _, weights = gguf_source.open_gguf_streamed(tiny.path, torch.float32)
    why = weights.exact_blocks("model.transformer.h.0.mlp.c_fc")
    assert why == ("Q8_0: the loader reshapes blk.0.ffn_up.weight (256 rows -> [1, 256]), so "
                   "its blocks do not map to the graph's weight")
