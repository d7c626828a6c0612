"""Prompts of different lengths decoded as one batch (``OnnxDecoder.decode_batch``, the quality
card's greedy prompts): the fused graph's GroupQueryAttention masks each right-padded row from
its own length, so every row's tokens and logits are those of the prompt decoded alone."""

from __future__ import annotations

import numpy as np
import pytest

from slmedge.runtimes.errors import UsageError
from slmedge.runtimes.sessions.onnx_decoder import OnnxDecoder

# lengths 1..7, unsorted: the longest is not first, and a one-token prompt has no padding peers
PROMPTS = [[5, 17, 3, 99], [8], [40, 41, 42, 43, 44, 45, 46], [7, 7], [100, 3, 60, 9, 12]]
NEW = 12


def one_at_a_time(decoder: OnnxDecoder, prompts, new_tokens, forced=None):
    tokens, rows = [], []
    for b, prompt in enumerate(prompts):
        decoder.reset()
        logits = decoder.step(prompt)
        got, kept = [], []
        for pos in range(new_tokens):
            kept.append(np.array(logits, dtype=np.float32))
            got.append(int(forced[b][pos]) if forced else int(np.argmax(logits)))
            if pos + 1 < new_tokens:
                logits = decoder.step([got[-1]])
        tokens.append(got)
        rows.append(np.stack(kept))
    decoder.reset()
    return tokens, rows


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma3_text", "phi3"])
def test_batch_equals_one_prompt_at_a_time(tiny_artifact, model_type):
    # gemma3_text: sliding-window layers (window 8) that the longer rows cross
    decoder = OnnxDecoder(tiny_artifact(model_type) / "model.onnx")
    assert decoder.batches_rows
    want_tokens, want_rows = one_at_a_time(decoder, PROMPTS, NEW)
    tokens, rows = decoder.decode_batch(PROMPTS, NEW)
    assert tokens == want_tokens
    assert len(set(sum(tokens, []))) > 3  # not one token repeated: the check can fail
    for got, want in zip(rows, want_rows, strict=True):
        assert got.shape == (NEW, decoder.vocab_size) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # the decoder's own cache is left empty: a step afterwards starts a new sequence
    np.testing.assert_allclose(decoder.step(PROMPTS[0]), want_rows[0][0], atol=1e-5, rtol=0)


def test_forced_tokens_are_fed_whatever_the_logits_say(tiny_artifact):
    decoder = OnnxDecoder(tiny_artifact("llama") / "model.onnx")
    forced = [[(3 * b + 5 * i) % 100 + 6 for i in range(NEW)] for b in range(len(PROMPTS))]
    want_tokens, want_rows = one_at_a_time(decoder, PROMPTS, NEW, forced=forced)
    tokens, rows = decoder.decode_batch(PROMPTS, NEW, forced=forced)
    assert tokens == want_tokens == forced
    for got, want in zip(rows, want_rows, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # the greedy rows differ from the forced ones after the first position
    greedy = decoder.decode_batch(PROMPTS, NEW)[1]
    assert not np.allclose(greedy[0][1:], rows[0][1:], atol=1e-3)


def test_int4_batch_is_bit_identical_to_one_at_a_time(tiny_artifact, tmp_path):
    """MatMulNBits at accuracy level 4 quantizes each row's activations on its own: a row's
    logits do not depend on the other rows of the batch."""
    from slmedge.exporter.quantize.pipeline import quantize_candidate
    from slmedge.exporter.quantize.recipe import QuantRecipe

    artifact = tiny_artifact("llama")
    quantize_candidate(artifact / "model.onnx", tmp_path / "model.onnx",
                       QuantRecipe(scheme="int4"), artifact)
    decoder = OnnxDecoder(tmp_path / "model.onnx")
    assert decoder.batches_rows  # quantization keeps the graph's metadata
    want_tokens, want_rows = one_at_a_time(decoder, PROMPTS, NEW)
    tokens, rows = decoder.decode_batch(PROMPTS, NEW)
    assert tokens == want_tokens
    for got, want in zip(rows, want_rows, strict=True):
        np.testing.assert_array_equal(got, want)


def test_graphs_that_cannot_batch_rows_say_so(tiny_artifact):
    # the exporter's mask as GQA's attention bias (left padding): rows are not masked by length
    masked = OnnxDecoder(tiny_artifact("llama", padding_mask=True) / "model.onnx")
    plain = OnnxDecoder(tiny_artifact("llama", fuse=False) / "model.onnx")
    for decoder in (masked, plain):
        assert not decoder.batches_rows
        with pytest.raises(UsageError, match="one at a time"):
            decoder.decode_batch(PROMPTS, 2)


def test_batch_past_the_maximum_length_is_the_same_error_as_a_step(tiny_artifact):
    decoder = OnnxDecoder(tiny_artifact("llama") / "model.onnx")
    longest = decoder._shared.max_length - 2
    with pytest.raises(UsageError, match="at most"):
        decoder.decode_batch([[5] * longest, [6]], 4)
    with pytest.raises(ValueError, match="at least one token"):
        decoder.decode_batch([[5], []], 4)
