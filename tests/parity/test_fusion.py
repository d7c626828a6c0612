"""Fused graphs (the default export) vs PyTorch, per architecture, on the tiny models.

For each of the six families: the fused ops are there in the expected numbers, logits
match PyTorch within 1e-4 for a prefill + 3 decode steps (and a 2-token chunk after
them) through the shared, preallocated KV buffer, 20 greedy tokens equal transformers'
``generate``, and the buffer is written in place. ``--no-fuse`` keeps standard ops.
"""

import json

import numpy as np
import onnx
import pytest
import torch
from helpers.tiny_models import TINY_MODEL_TYPES, tiny_config
from transformers import AutoModelForCausalLM

from slmedge.runtimes.generation import generate
from slmedge.runtimes.sessions.kv_buffer import SharedKVBuffer
from slmedge.runtimes.sessions.onnx_decoder import OnnxDecoder

ATOL = 1e-4
ROTARY = {"llama", "qwen2", "qwen3", "gemma3_text", "phi3"}
# distinct rotary tables (Gemma 3: a local and a global RoPE base); the others have one
ROTARY_TABLES = {"gemma3_text": 2}
# RMSNorms that stay unfused-with-a-residual: the first input norm (no residual before it)
# plus per-head q/k norms (Qwen3, Gemma 3: 2 per layer).
PLAIN_RMS = {"llama": 1, "qwen2": 1, "phi3": 1, "qwen3": 1 + 2 * 2, "gemma3_text": 1 + 2 * 2 + 2 * 2}


def _torch(tiny_dir, model_type):
    return AutoModelForCausalLM.from_pretrained(tiny_dir(model_type), dtype=torch.float32).eval()


def _op_counts(path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_fused_ops_are_present_and_counted_in_the_manifest(model_type, tiny_artifact):
    artifact = tiny_artifact(model_type)
    manifest = json.loads((artifact / "manifest.json").read_text())
    layers = manifest["architecture"]["num_layers"]
    counts = manifest["fusion"]["counts"]
    ops = _op_counts(artifact / "model.onnx")
    assert ops["GroupQueryAttention"] == counts["GroupQueryAttention"] == layers
    assert counts["RotaryEmbedding(in GroupQueryAttention)"] == (layers if model_type in ROTARY else 0)
    assert counts["logits_to_keep"] == 1
    # q/k/v projections packed into one MatMul (or Phi-3's / GPT-2's fused qkv used as is),
    # except where a per-head q/k norm sits between projection and attention.
    packed = 0 if model_type in ("qwen3", "gemma3_text") else layers
    assert counts["packed QKV (GroupQueryAttention)"] == packed
    # Nothing of the unfused attention is left: no Softmax, no transposes, no rotary
    # arithmetic, and the cache is read by GroupQueryAttention only (no Concat, no repeat_kv).
    assert "Softmax" not in ops, ops
    graph = onnx.load(str(artifact / "model.onnx"), load_external_data=False).graph
    # Cos/Sin only build GroupQueryAttention's caches (positions 0..max-1) from constants, so
    # ONNX Runtime folds them at load; the file stores no [max_sequence_length, D/2] table.
    rotary = [n for n in graph.node if n.op_type in ("Cos", "Sin")]
    assert all(n.name.startswith("gqa.rotary") for n in rotary), [n.name for n in rotary]
    assert len(rotary) == (2 * ROTARY_TABLES.get(model_type, 1) if model_type in ROTARY else 0)
    graph_inputs = {i.name for i in graph.input}
    assert not any(i in graph_inputs for n in graph.node if n.name.startswith("gqa.rotary") for i in n.input)
    assert not any(t.name.endswith(("cos_cache", "sin_cache")) for t in graph.initializer)
    # the one Transpose left is a tied table's embedding lookup (passes/tied_head.py)
    assert ops.get("Transpose", 0) == counts["tied lm_head table stored once ([1,K,V])"], ops
    readers = {n.op_type for n in graph.node for i in n.input if i.startswith("past_key_values")}
    assert readers == {"GroupQueryAttention"}
    if model_type == "gpt2":
        assert ops["SkipLayerNormalization"] == 2 * layers + 1 == counts["SkipLayerNormalization"]
        assert ops["FastGelu"] == layers and counts["BiasGelu/FastGelu+bias"] == layers
        assert "LayerNormalization" not in ops and "Gemm" not in ops
    else:
        # Per layer: the post-attention norm and the next layer's (or the final) input norm
        # take the residual Add; Gemma 3 has 4 norms per layer, two of them after a residual.
        assert ops["SkipSimplifiedLayerNormalization"] == 2 * layers
        assert ops.get("SimplifiedLayerNormalization", 0) == PLAIN_RMS[model_type]
        assert "Pow" not in ops and "ReduceMean" not in ops
    # GQA masks by itself (seqlens_k from the attention_mask): no mask tensor or position ids
    # per step (padding_mask=False); the norms' unused statistics outputs are not computed.
    gqa_inputs = {len(n.input) for n in graph.node if n.op_type == "GroupQueryAttention"}
    assert gqa_inputs == {9 if model_type in ROTARY else 7}
    assert manifest["fusion"]["padding"].startswith("one sequence or right-padded")
    stats = [o for n in graph.node if "Normalization" in n.op_type for o in n.output[1:3]]
    assert stats and not any(stats)
    assert counts["unused norm statistics outputs dropped"] == len(stats)
    if model_type == "gemma3_text":
        assert ops["FastGelu"] == layers
        model = onnx.load(str(artifact / "model.onnx"), load_external_data=False)
        windows = [next(a.i for a in n.attribute if a.name == "local_window_size")
                   for n in model.graph.node if n.op_type == "GroupQueryAttention"]
        config = tiny_config(model_type)
        assert windows == [config.sliding_window if t == "sliding_attention" else -1
                           for t in config.layer_types]


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_fused_logits_match_pytorch_through_the_shared_kv_buffer(model_type, tiny_dir, tiny_artifact):
    model = _torch(tiny_dir, model_type)
    decoder = OnnxDecoder(tiny_artifact(model_type) / "model.onnx")
    assert decoder._shared is not None and decoder.has_logits_to_keep
    rng = np.random.default_rng(5)
    prompt = rng.integers(0, 128, 12).tolist()  # longer than Gemma's sliding window (8)
    steps = rng.integers(0, 128, 3).tolist()
    chunk = rng.integers(0, 128, 2).tolist()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        np.testing.assert_allclose(decoder.step(prompt, all_logits=True), out.logits[0].numpy(),
                                   atol=ATOL, rtol=0)
        cache = out.past_key_values
        for tok in steps:
            out = model(input_ids=torch.tensor([[tok]]), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            np.testing.assert_allclose(decoder.step([tok]), out.logits[0, -1].numpy(), atol=ATOL, rtol=0)
        # A chunk of 2 after decode steps (GQA's "subsequent prompt" path).
        out = model(input_ids=torch.tensor([chunk]), past_key_values=cache, use_cache=True)
        np.testing.assert_allclose(decoder.step(chunk, all_logits=True), out.logits[0].numpy(),
                                   atol=ATOL, rtol=0)
    assert decoder.length == len(prompt) + len(steps) + len(chunk)


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_fused_greedy_tokens_equal_transformers_generate(model_type, tiny_dir, tiny_artifact):
    model = _torch(tiny_dir, model_type)
    prompt = [9, 44, 3, 17, 60, 21, 8, 100, 5]
    with torch.no_grad():
        ref = model.generate(
            torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20, do_sample=False,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        )[0, len(prompt):].tolist()
    decoder = OnnxDecoder(tiny_artifact(model_type) / "model.onnx")
    assert generate(decoder, prompt, 20).tokens == ref
    assert len(set(ref)) > 1
    # Again on the same decoder: reset() reuses the buffer, stale entries are never read.
    assert generate(decoder, prompt, 20).tokens == ref


def test_kv_buffer_is_written_in_place_and_grows_without_changing_results(tiny_artifact):
    path = tiny_artifact("llama") / "model.onnx"
    reference = OnnxDecoder(path)
    ids = list(range(3, 23))
    want = reference.step(ids, all_logits=True)

    decoder = OnnxDecoder(path)
    shared = decoder._shared
    decoder._shared = shared = SharedKVBuffer(shared.past_names, shared.present_names,
                                              shared.kv_heads, shared.head_dim, shared.dtype,
                                              shared.max_length, initial_capacity=4)
    first = shared.arrays[0]
    got = [decoder.step(ids[:3], all_logits=True)]
    assert shared.arrays[0] is first and shared.capacity == 4
    assert np.abs(first[0, :, :3]).sum() > 0 and not first[0, :, 3:].any()  # written in place
    got.append(decoder.step(ids[3:4], all_logits=True))
    assert shared.arrays[0] is first  # no copy while it fits
    for i in range(4, len(ids)):  # grows 4 -> 8 -> 16 -> 32, keeping what was cached
        got.append(decoder.step([ids[i]], all_logits=True))
    assert shared.capacity == 32
    np.testing.assert_allclose(np.concatenate(got), want, atol=1e-5, rtol=0)


def test_a_sequence_longer_than_the_graph_supports_is_a_clear_error(tiny_artifact):
    from slmedge.runtimes.errors import UsageError

    decoder = OnnxDecoder(tiny_artifact("llama") / "model.onnx")
    too_long = decoder._shared.max_length + 1
    with pytest.raises(UsageError, match="at most"):
        decoder.step([1] * too_long)


def test_padding_mask_keeps_the_exporters_mask_in_the_attention(tiny_artifact):
    """--padding-mask: every GQA node reads the exporter's mask (attention_bias) and the
    position ids; the manifest says which padding the graph is exact for (left padding is
    compared with PyTorch in test_export_parity)."""
    artifact = tiny_artifact("llama", padding_mask=True)
    graph = onnx.load(str(artifact / "model.onnx"), load_external_data=False).graph
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert gqa and all(len(n.input) == 11 and n.input[9] == "position_ids" and n.input[10]
                       for n in gqa)
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["fusion"]["padding"].startswith("left- or right-padded")


def test_no_fuse_export_keeps_standard_ops(tiny_artifact):
    out = tiny_artifact("llama", fuse=False)  # run_export(ExportConfig(..., fuse=False)), shared
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["fusion"] is None
    assert manifest["verification"]["parity"]["passed"]
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert {n.domain for n in model.graph.node} <= {""}
    ops = {n.op_type for n in model.graph.node}
    assert "Softmax" in ops and "GroupQueryAttention" not in ops
    decoder = OnnxDecoder(out / "model.onnx")
    assert decoder._shared is None and not decoder.has_logits_to_keep
    prompt = [9, 44, 3, 17, 60, 21]
    fused = OnnxDecoder(tiny_artifact("llama") / "model.onnx")
    assert generate(decoder, prompt, 12).tokens == generate(fused, prompt, 12).tokens


def _folded_rotary_tables(path) -> list[tuple[int, ...]]:
    """Shapes of the cos/sin caches GroupQueryAttention reads once ONNX Runtime has folded
    them at load (what the session holds), from its optimized graph."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(path.with_name("folded.onnx"))
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(options.optimized_model_filepath).graph
    inits = {t.name: tuple(t.dims) for t in graph.initializer}
    caches = {n.input[i] for n in graph.node if n.op_type == "GroupQueryAttention" for i in (7, 8)}
    return sorted(inits[name] for name in caches)


def test_max_context_sizes_the_rotary_tables_and_keeps_the_logits(tiny_artifact, tmp_path):
    """--max-context 48 (the tiny Gemma 3 allows 512): the rotary tables ONNX Runtime computes
    at load hold 48 positions (both RoPE bases), the manifest and the graph say so, and the
    logits of a sequence within the cap equal the uncapped graph's."""
    full = tiny_artifact("gemma3_text")
    capped = tiny_artifact("gemma3_text", max_context=48)
    fusion = json.loads((capped / "manifest.json").read_text())["fusion"]
    assert (fusion["max_sequence_length"], fusion["model_max_sequence_length"]) == (48, 512)
    uncapped = json.loads((full / "manifest.json").read_text())["fusion"]
    assert (uncapped["max_sequence_length"], uncapped["model_max_sequence_length"]) == (512, None)
    meta = {p.key: p.value for p in onnx.load(str(capped / "model.onnx"),
                                              load_external_data=False).metadata_props}
    assert meta["slmedge.max_sequence_length"] == "48"
    assert meta["slmedge.model_max_sequence_length"] == "512"
    half = tiny_config("gemma3_text").head_dim // 2
    for artifact, positions in ((capped, 48), (full, 512)):
        (tmp_path / str(positions)).mkdir()
        copy = tmp_path / str(positions) / "model.onnx"
        copy.write_bytes((artifact / "model.onnx").read_bytes())
        assert _folded_rotary_tables(copy) == [(positions, half)] * 4  # cos, sin x 2 bases
    ids = list(range(5, 45))
    want = OnnxDecoder(full / "model.onnx")
    got = OnnxDecoder(capped / "model.onnx")
    np.testing.assert_array_equal(got.step(ids[:30], all_logits=True),
                                  want.step(ids[:30], all_logits=True))
    for i in ids[30:]:
        np.testing.assert_array_equal(got.step([i]), want.step([i]))
    assert got.length == 40


def test_a_sequence_past_max_context_is_refused_naming_the_cap(tiny_artifact):
    """generate() refuses before the prefill when prompt + new tokens would pass the cap
    (the error names the cap, the model's maximum and the flag); exactly at the cap it runs."""
    from slmedge.runtimes.errors import UsageError

    decoder = OnnxDecoder(tiny_artifact("gemma3_text", max_context=48) / "model.onnx")
    prompt = list(range(5, 45))  # 40 tokens: 40 + 8 new = 48 positions fed (the last is not)
    assert len(generate(decoder, prompt, 9).tokens) == 9
    with pytest.raises(UsageError) as e:
        generate(decoder, prompt, 10)
    message = str(e.value)
    assert "49 tokens long" in message and "at most 48 positions" in message
    assert "--max-context 48" in message and "the model allows 512" in message
    assert "larger --max-context (at most 512)" in message
    assert decoder.length == 40 + 8  # the refused call did not touch the cache
    with pytest.raises(UsageError, match="at most 48 positions"):
        decoder.step([1] * 9)  # step() past the cap: the same error


@pytest.mark.parametrize("case, message", [
    ({"max_context": 513}, "more than this model's maximum of 512"),
    ({"max_context": 48, "fuse": False}, "not fused \\(--no-fuse\\)"),
    ({"max_context": 48, "profile": "android-qnn-htp"}, "static shapes whose context is its "
     "shapes.context_length \\(512\\)"),
])
def test_max_context_refuses_what_it_cannot_do(case, message, tiny_dir, tmp_path):
    from slmedge.exporter.pipeline import ExportConfig, run_export
    from slmedge.runtimes.errors import UsageError

    with pytest.raises(UsageError, match=message):
        run_export(ExportConfig(model=str(tiny_dir("gemma3_text")), output=tmp_path / "a", **case))
