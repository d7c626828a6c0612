"""Exported ONNX vs PyTorch, per architecture, on tiny random models of the real config classes.

Logits within 1e-4 (fp32) for a prefill and 3 decode steps; 20 greedy tokens equal to
``transformers``' ``generate``; dynamic batch with left padding; fp16 export.
"""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers.tiny_models import TINY_MODEL_TYPES
from transformers import AutoModelForCausalLM

from slmedge.runtimes.generation import generate
from slmedge.runtimes.sessions.onnx_decoder import OnnxDecoder

ATOL = 1e-4


def _torch_model(path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_prefill_and_decode_logits_match_pytorch(model_type, tiny_dir, tiny_artifact):
    model = _torch_model(tiny_dir(model_type))
    decoder = OnnxDecoder(tiny_artifact(model_type) / "model.onnx")
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, 128, 12).tolist()  # longer than Gemma's sliding window (8)
    steps = rng.integers(0, 128, 3).tolist()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        got = decoder.step(prompt, all_logits=True)
        np.testing.assert_allclose(got, out.logits[0].numpy(), atol=ATOL, rtol=0)
        cache = out.past_key_values
        for tok in steps:
            out = model(input_ids=torch.tensor([[tok]]), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            np.testing.assert_allclose(decoder.step([tok]), out.logits[0, -1].numpy(), atol=ATOL, rtol=0)
    assert decoder.length == len(prompt) + len(steps)


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_twenty_greedy_tokens_equal_transformers_generate(model_type, tiny_dir, tiny_artifact):
    model = _torch_model(tiny_dir(model_type))
    prompt = [7, 21, 33, 4, 90, 15]
    with torch.no_grad():
        ref = model.generate(
            torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20, do_sample=False,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        )[0, len(prompt):].tolist()
    got = generate(OnnxDecoder(tiny_artifact(model_type) / "model.onnx"), prompt, 20).tokens
    assert got == ref
    assert len(set(ref)) > 1  # the comparison is not between two constant sequences


def _padded_batch_logits(artifact: Path, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray):
    session = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    manifest = json.loads((artifact / "manifest.json").read_text())
    arch = manifest["architecture"]
    empty = np.zeros((len(ids), arch["kv_heads"], 0, arch["head_dim"]), np.float32)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    feeds |= {n: empty for n in manifest["io"]["inputs"] if n.startswith("past_key_values")}
    if "logits_to_keep" in manifest["io"]["inputs"]:  # fused graphs: 0 = every position
        feeds["logits_to_keep"] = np.array(0, dtype=np.int64)
    return session.run(["logits"], feeds)[0]


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "gpt2"])
def test_dynamic_batch_with_right_padding(model_type, tiny_dir, tiny_artifact):
    """Batch 2, second row right-padded (ONNX Runtime GenAI's convention), default export
    (fused: GQA masks from sum(attention_mask)): the real positions match PyTorch."""
    model = _torch_model(tiny_dir(model_type))
    artifact = tiny_artifact(model_type)
    ids = np.random.default_rng(4).integers(0, 128, (2, 9))
    mask = np.ones((2, 9), dtype=np.int64)
    mask[1, 6:] = 0
    pos = np.tile(np.arange(9), (2, 1))
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(pos)).logits.numpy()
    logits = _padded_batch_logits(artifact, ids, mask, pos)
    np.testing.assert_allclose(logits[0], ref[0], atol=ATOL, rtol=0)
    np.testing.assert_allclose(logits[1, :6], ref[1, :6], atol=ATOL, rtol=0)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "gpt2"])
def test_dynamic_batch_with_left_padding(model_type, tiny_dir, tiny_artifact):
    """Batch 2, second row left-padded: same logits as PyTorch with ``padding_mask`` (the
    exporter's mask kept in the fused attention); the default fused graph gets them wrong,
    which is why the option exists."""
    model = _torch_model(tiny_dir(model_type))
    artifact = tiny_artifact(model_type, padding_mask=True)
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 128, (2, 9))
    mask = np.ones((2, 9), dtype=np.int64)
    mask[1, :3] = 0
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(pos)).logits.numpy()
    logits = _padded_batch_logits(artifact, ids, mask, pos)
    # Padded positions attend to nothing real; compare the real ones.
    np.testing.assert_allclose(logits[0], ref[0], atol=ATOL, rtol=0)
    np.testing.assert_allclose(logits[1, 3:], ref[1, 3:], atol=ATOL, rtol=0)
    default = _padded_batch_logits(tiny_artifact(model_type), ids, mask, pos)
    assert np.abs(default[1, 3:] - ref[1, 3:]).max() > 100 * ATOL


def test_fp16_export_runs_and_tracks_fp32(tiny_dir, tiny_artifact):
    artifact = tiny_artifact("llama", "fp16")
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["recipe"]["dtype"] == "fp16"
    decoder = OnnxDecoder(artifact / "model.onnx")
    assert decoder.kv.dtype == np.float16
    model = _torch_model(tiny_dir("llama"))
    prompt = list(range(10, 30))
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([prompt])).logits[0].numpy()
    got = decoder.step(prompt, all_logits=True).astype(np.float32)
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() < 2e-2 * scale
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.9
    # Weights, not file sizes: the fp32 graph is fused (fewer nodes), the fp16 one is not.
    assert _weight_bytes(artifact) < 0.6 * _weight_bytes(tiny_artifact("llama"))


def _weight_bytes(artifact) -> int:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(artifact / "model.onnx"))
    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
