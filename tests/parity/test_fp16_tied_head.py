"""An fp16 tied lm_head is computed in vocabulary chunks (passes/tied_head.py
``Fp16TiedHeadChunks``: no whole-table fp32 Cast per forward in a session that keeps fp16
weights fp16, issue 15's 3B fp16 export peak): the logits are the unchunked graph's (bit for
bit for GPT-2, within one fp16 step of their scale for Gemma 3), in ONNX Runtime's default session and in the keep-fp16 one; the runtime's decoder
runs the new form; untied models are left alone."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import numpy_helper
import pytest
from helpers.tiny_models import TINY_MODEL_TYPES

from slmedge.exporter.onnx import streaming
from slmedge.exporter.onnx.streaming import export_streamed
from slmedge.exporter.passes import tied_head
from slmedge.exporter.passes.tied_head import chunks_head, vocabulary_chunks
from slmedge.exporter.quality.memory import verification_session_options
from slmedge.exporter.sources.load import open_source
from slmedge.runtimes.sessions.onnx_decoder import OnnxDecoder

PROMPT = [3, 17, 42, 99, 5, 64, 7, 120, 1, 33]


def _logits(path, keep_fp16: bool) -> list[np.ndarray]:
    decoder = OnnxDecoder(path, session_options=verification_session_options(keep_fp16))
    out = [decoder.step(PROMPT, all_logits=True)]
    for token in (11, 77):  # two decode steps on the KV cache
        out.append(decoder.step([token]))
    return out


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_fp16_head_in_chunks_gives_the_unchunked_logits(model_type, tiny_dir, tmp_path,
                                                        monkeypatch):
    source = tiny_dir(model_type)
    tied = json.loads((source / "config.json").read_text()).get("tie_word_embeddings", True)
    monkeypatch.setattr(tied_head, "CHUNKED_HEAD_MIN_BYTES", 0)  # the tiny heads chunked too
    messages: list[str] = []
    export_streamed(open_source(str(source), dtype="fp16"), tmp_path / "chunked.onnx",
                    say=messages.append)
    monkeypatch.setattr(streaming, "fp16_tied_head", lambda graph, say=None: 0)
    export_streamed(open_source(str(source), dtype="fp16"), tmp_path / "plain.onnx")
    graph = onnx.load(str(tmp_path / "chunked.onnx")).graph
    loops = [n for n in graph.node if n.op_type == "Loop"]
    if not tied:
        assert loops == []
        return
    assert len(loops) == 1 and any("vocabulary chunks" in m for m in messages)
    # the table once, as [1, K, V]: no [V, K] or [K, V] copy beside it
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    table = next(a for a in arrays.values() if a.shape == (1, 64, 128))[0]
    assert table.dtype == np.float16
    assert not [n for n, a in arrays.items() if a.ndim == 2 and a.size == table.size and (
        np.array_equal(a, table) or np.array_equal(a, table.T))]
    for keep_fp16 in (False, True):
        for got, want in zip(_logits(tmp_path / "chunked.onnx", keep_fp16),
                             _logits(tmp_path / "plain.onnx", keep_fp16)):
            assert got.dtype == want.dtype and got.shape == want.shape
            if model_type == "gpt2":  # the head is the graph's last op: the same dot products
                np.testing.assert_array_equal(got, want)
            else:  # Gemma 3: ONNX Runtime's cast insertion rounds around the unchunked MatMul
                scale = float(np.abs(want).max())  # differently (fp16 steps; not traced further)
                np.testing.assert_allclose(got, want, rtol=0, atol=scale * 2**-9)


def test_chunk_counts_at_real_shapes():
    """The fewest chunks (at least 2) of at most 64 MiB fp32 that divide the vocabulary."""
    assert vocabulary_chunks(128256, 3072) == 24  # Llama-3.2-3B: 5344 columns, 63 MiB
    assert vocabulary_chunks(151936, 896) == 16  # Qwen2.5-0.5B: 9496 columns
    assert vocabulary_chunks(49152, 576) == 2  # SmolLM2-135M
    assert vocabulary_chunks(128, 64) == 2  # the tiny models
    assert vocabulary_chunks(7919, 4096) is None  # a prime vocabulary: one MatMul


def test_only_heads_whose_fp32_copy_reaches_a_gib_are_chunked(tiny_dir, tmp_path):
    """Below CHUNKED_HEAD_MIN_BYTES the graph keeps its own head (folded to fp32 once at load
    in ONNX Runtime's default session: a chunked SmolLM2 fp16 head decoded 1.29x slower)."""
    assert chunks_head(128256, 3072) and chunks_head(128256, 4096)  # Llama-3.2-3B, 3.1-8B
    assert not chunks_head(128256, 2048)  # Llama-3.2-1B: 1.05 GB
    assert not chunks_head(262144, 640) and not chunks_head(49152, 576)  # Gemma 3 270M, SmolLM2
    messages: list[str] = []
    export_streamed(open_source(str(tiny_dir("gpt2")), dtype="fp16"), tmp_path / "m.onnx",
                    say=messages.append)
    assert not [n for n in onnx.load(str(tmp_path / "m.onnx")).graph.node if n.op_type == "Loop"]
    assert not any("vocabulary chunks" in m for m in messages)
