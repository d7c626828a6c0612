"""The quality card with its reference run first and replayed from disk (one ONNX Runtime
session at a time, issue 15) gives the same card as both sessions side by side."""

from __future__ import annotations

import numpy as np
import pytest

from slmedge.exporter.quality.card import (
    QualitySettings,
    RecordedReference,
    artifact_card,
    decoder_card,
)
from slmedge.runtimes.sessions.onnx_decoder import OnnxDecoder

SETTINGS = QualitySettings(eval_tokens=150, window=64, stride=32,
                           prompts=("The capital of France is", "def f(x):"), new_tokens=6)


def test_sequential_card_equals_side_by_side(tiny_artifact):
    reference = tiny_artifact("llama") / "model.onnx"
    candidate_dir = tiny_artifact("llama", dtype="fp16")
    candidate = candidate_dir / "model.onnx"
    side_by_side = decoder_card(OnnxDecoder(candidate), candidate_dir, SETTINGS,
                                reference=OnnxDecoder(reference)).to_dict()
    sequential = artifact_card(candidate, candidate_dir, SETTINGS,
                               reference_model=reference).to_dict()
    side_by_side.pop("seconds"), sequential.pop("seconds")
    assert sequential["greedy"]["prompts"] == 2
    assert sequential["eval"]["windows"] >= 2
    assert sequential["kl_mean"] > 0  # fp16 vs fp32: the card compares two different graphs
    assert sequential == side_by_side
    # the scratch file of the reference's logits is gone
    assert not list(candidate_dir.glob(".card-reference-*"))


class _Counting:
    """Logits from the tokens: row i = one-hot of (token_i + 1) % 8, scaled."""

    def reset(self):
        pass

    def step(self, token_ids, all_logits=False):
        rows = np.zeros((len(token_ids), 8), np.float32)
        rows[np.arange(len(token_ids)), (np.asarray(token_ids) + 1) % 8] = 3.0
        return rows if all_logits else rows[-1]


def test_recorded_reference_replays_and_refuses_other_tokens(tmp_path):
    recorded = RecordedReference(tmp_path / "logits")
    live = recorded.wrap(_Counting())
    first = live.step([1, 2, 3], all_logits=True)
    second = live.step([4])
    recorded.finish()
    np.testing.assert_array_equal(recorded.step([1, 2, 3], all_logits=True), first)
    with pytest.raises(RuntimeError, match="differs from the recorded one"):
        recorded.step([5])
    np.testing.assert_array_equal(recorded.step([4]), second)
    with pytest.raises(RuntimeError, match="asked for one more"):
        recorded.step([4])


def test_keep_prefill_computes_a_repeated_window_once():
    from slmedge.exporter.quality.card import KeepPrefill

    calls = []

    class Logged(_Counting):
        def step(self, token_ids, all_logits=False):
            calls.append((tuple(token_ids), all_logits))
            return super().step(token_ids, all_logits)

    kept = KeepPrefill(Logged(), [1, 2, 3])
    first = kept.step([1, 2, 3], all_logits=True)
    kept.reset()
    np.testing.assert_array_equal(kept.step([1, 2, 3], all_logits=True), first)
    with pytest.raises(RuntimeError, match="needs reset"):
        kept.step([4])
    kept.reset()
    kept.step([1, 2, 3])  # last position only: computed
    kept.step([1, 2, 3], all_logits=True)  # not from a fresh state: computed
    assert calls == [((1, 2, 3), True), ((1, 2, 3), False), ((1, 2, 3), True)]



def test_token_nll_in_chunks_is_the_whole_window_formula():
    from slmedge.runtimes.evaluate import token_nll

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (150, 40)).astype(np.float32)
    targets = rng.integers(0, 40, 150)
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    whole = m[:, 0] + np.log(np.exp(x - m).sum(axis=-1)) - x[np.arange(150), targets]
    np.testing.assert_array_equal(token_nll(logits, targets, chunk=16), whole)
    np.testing.assert_array_equal(token_nll(logits, targets), whole)


def _one_at_a_time(decoder):
    """The decoder as the card sees one without ``decode_batch`` (a LiteRT or static-shape
    one): the wrapper of tools/bench/bench_card_batch.py, which measures the same two ways."""
    from helpers.bench_scripts import load_bench_script

    return load_bench_script("bench_card_batch")._OneAtATime(decoder)


def test_card_with_batched_greedy_prompts_equals_one_prompt_at_a_time(tiny_artifact, tmp_path):
    from slmedge.exporter.quantize.pipeline import quantize_candidate
    from slmedge.exporter.quantize.recipe import QuantRecipe

    artifact = tiny_artifact("llama")
    quantize_candidate(artifact / "model.onnx", tmp_path / "model.onnx",
                       QuantRecipe(scheme="int4"), artifact)
    settings = QualitySettings(eval_tokens=150, window=64, stride=32,
                               prompts=("The capital of France is", "def f(x):",
                                        "Once upon a time"), new_tokens=12)
    reference = OnnxDecoder(artifact / "model.onnx")
    candidate = OnnxDecoder(tmp_path / "model.onnx")
    assert reference.batches_rows and candidate.batches_rows
    batched = decoder_card(candidate, artifact, settings, reference=reference).to_dict()
    single = decoder_card(_one_at_a_time(candidate), artifact, settings,
                          reference=_one_at_a_time(reference)).to_dict()
    batched.pop("seconds"), single.pop("seconds")
    assert 0.0 < batched["greedy"]["top1_agreement"] < 1.0  # the int4 copy leaves the text
    assert batched == single
    # one batched, the other one at a time: the same card too
    mixed = decoder_card(_one_at_a_time(candidate), artifact, settings, reference=reference).to_dict()
    mixed.pop("seconds")
    assert mixed == single


def test_recorded_batch_replays_and_refuses_other_prompts(tmp_path):
    class Batching(_Counting):
        batches_rows = True

        def decode_batch(self, prompts, new_tokens, forced=None):
            tokens = [[(p[-1] + 1 + i) % 8 for i in range(new_tokens)] for p in prompts]
            rows = [np.stack([self.step([t]) for t in [p[-1], *ts[:-1]]])
                    for p, ts in zip(prompts, tokens)]
            return tokens, rows

    recorded = RecordedReference(tmp_path / "logits")
    live = recorded.wrap(Batching())
    assert live.batches_rows
    live.step([1, 2], all_logits=True)
    tokens, rows = live.decode_batch([[1, 2], [5]], 3)
    recorded.finish()
    assert recorded.batches_rows
    np.testing.assert_array_equal(recorded.step([1, 2], all_logits=True)[0],
                                  [0, 0, 3, 0, 0, 0, 0, 0])
    with pytest.raises(RuntimeError, match="differs from the recorded one"):
        recorded.decode_batch([[1, 2], [6]], 3)
    got_tokens, got_rows = recorded.decode_batch([[1, 2], [5]], 3)
    assert got_tokens == tokens == [[3, 4, 5], [6, 7, 0]]
    for got, want in zip(got_rows, rows, strict=True):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(RuntimeError, match="one more"):
        recorded.decode_batch([[1, 2], [5]], 3)
