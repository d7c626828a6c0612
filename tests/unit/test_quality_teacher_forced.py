"""The quality card against a large fp32 graph (issue 15's export time): the candidate generates
the greedy text and the graph scores it teacher-forced, one prefill per prompt, instead of
decoding its own greedy tokens step by step. The evaluation windows' figures are the same
recording either way; the greedy section's first divergence is the same position."""

from __future__ import annotations

import numpy as np
import pytest

from slmedge.exporter.quality.card import GraphScorer, QualitySettings, artifact_card
from slmedge.runtimes.sessions.onnx_decoder import OnnxDecoder

SETTINGS = QualitySettings(eval_tokens=150, window=64, stride=32,
                           prompts=("The capital of France is", "def f(x):",
                                    "Once upon a time"), new_tokens=12)


@pytest.fixture(scope="module")
def int4_pair(tiny_artifact, tmp_path_factory):
    """(fp32 graph, its int4 copy, tokenizer dir) of the tiny Llama."""
    from slmedge.exporter.quantize.pipeline import quantize_candidate
    from slmedge.exporter.quantize.recipe import QuantRecipe

    artifact = tiny_artifact("llama")
    out = tmp_path_factory.mktemp("int4") / "model.onnx"
    quantize_candidate(artifact / "model.onnx", out, QuantRecipe(scheme="int4"), artifact)
    return artifact / "model.onnx", out, artifact


def test_graph_scorer_equals_the_graph_decoding_step_by_step(int4_pair):
    reference, _, _ = int4_pair
    prompt, tokens = [5, 17, 3, 99], [42, 7, 64, 11, 2]
    decoder = OnnxDecoder(reference)
    stepped = [decoder.step(prompt)]
    for t in tokens[:-1]:
        stepped.append(decoder.step([t]))
    rows = GraphScorer(reference).score([prompt + tokens[:-1], prompt[:2]], len(tokens))
    assert rows[0].shape == (len(tokens), decoder.vocab_size) and rows[0].dtype == np.float32
    # the prefill's row j is the decode step that fed token j-1
    np.testing.assert_allclose(rows[0], np.stack(stepped), atol=1e-4, rtol=1e-4)
    # a sequence shorter than `last`: its rows are all its positions
    np.testing.assert_allclose(rows[1], decoder.logits(prompt[:2]), atol=1e-5)


def test_teacher_forced_card_matches_the_step_by_step_card(int4_pair):
    reference, candidate, tokenizer_dir = int4_pair
    timings: dict = {}
    stepped = artifact_card(candidate, tokenizer_dir, SETTINGS, reference_model=reference,
                            teacher_forced_from=None)
    forced = artifact_card(candidate, tokenizer_dir, SETTINGS, reference_model=reference,
                           teacher_forced_from=0, timings=timings)
    # the windows are the same recording, compared with the same candidate
    for key in ("perplexity", "reference_perplexity", "kl_mean", "top1_agreement_eval",
                "cosine_mean", "replay"):
        assert getattr(forced, key) == getattr(stepped, key), key
    s, f = stepped.greedy, forced.greedy
    assert f["generated_by"] == "candidate" and "generated_by" not in s
    assert (f["prompts"], f["new_tokens"]) == (s["prompts"], s["new_tokens"]) == (3, 12)
    # the int4 copy of a random-weight model leaves the reference's greedy text early: the
    # first divergence is compared where there is one, and it is the same position either way
    assert s["first_divergence_min"] < SETTINGS.new_tokens
    assert f["first_divergence"] == s["first_divergence"]
    assert f["prompts_identical"] == s["prompts_identical"]
    assert 0.0 < f["top1_agreement"] < 1.0 and f["kl_mean"] > 0.0
    assert any("teacher-forced" in n and "generated_by" in n for n in forced.notes)
    assert not any("teacher-forced" in n for n in stepped.notes)
    assert forced.reference == stepped.reference == "fp32 graph"
    assert timings["reference"] > 0.0


def test_small_graphs_keep_the_step_by_step_greedy_by_default(int4_pair):
    reference, candidate, tokenizer_dir = int4_pair
    card = artifact_card(candidate, tokenizer_dir, SETTINGS, reference_model=reference)
    assert "generated_by" not in card.greedy  # the tiny graph is far below the threshold
    bigger = artifact_card(candidate, tokenizer_dir, SETTINGS, reference_model=reference,
                           teacher_forced_from=reference.stat().st_size)
    assert bigger.greedy["generated_by"] == "candidate"  # the threshold is inclusive
