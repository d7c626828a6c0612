"""The quality card's reference streamed from the source in PyTorch, one layer at a time
(issue 15): its logits are the model's, and a card against it is the card against the fp32
graph (greedy text scored the other way round)."""

from __future__ import annotations

import numpy as np
import pytest

from slmedge.exporter.quality.card import (
    QualitySettings,
    RecordedReference,
    artifact_card,
    record_reference,
)
from slmedge.runtimes.sessions.onnx_decoder import OnnxDecoder

SETTINGS = QualitySettings(eval_tokens=150, window=64, stride=32,
                           prompts=("The capital of France is", "def f(x):"), new_tokens=6)


def _streamed(directory, progress=None):
    from transformers import AutoConfig

    from slmedge.exporter.onnx.lazy_weights import SafetensorsWeights
    from slmedge.exporter.quality.streamed_reference import StreamedReference

    return StreamedReference(AutoConfig.from_pretrained(directory),
                             SafetensorsWeights(directory), source_dtype="fp32",
                             progress=progress)


def _held(reference) -> int:
    return sum(p.numel() for p in reference.model.parameters())


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "gemma3_text", "phi3",
                                        "gpt2"])
def test_streamed_logits_equal_pytorch(tiny_dir, model_type):
    import torch
    from transformers import AutoModelForCausalLM

    directory = tiny_dir(model_type)
    said = []
    reference = _streamed(directory, said.append)
    # two sequences of different lengths in one right-padded batch (gemma3's sliding window
    # is 8: both are longer)
    sequences = [list(range(7, 47)), list(range(9, 30))]
    got = [reference.logits(h) for h in reference.hidden_states(sequences)]
    reference.release()
    assert _held(reference) == 0  # every weight dropped after the pass
    # one pass: each layer read once for the whole batch
    assert [m for m in said if "layer" in m][:2] == [
        "streamed reference: layer 1/2 of 2 sequences",
        next(m for m in said if "layer 2/2" in m)]
    assert sum("layer" in m for m in said) == 2
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    for seq, logits in zip(sequences, got):
        with torch.no_grad():
            want = model(torch.tensor([seq])).logits[0].numpy()
        assert logits.shape == want.shape
        np.testing.assert_allclose(logits, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_streamed_logits_equal_fp32_graph(tiny_dir, tiny_artifact, model_type):
    reference = _streamed(tiny_dir(model_type))
    seq = list(range(3, 70))
    streamed = reference.score([seq], len(seq))[0]  # score() releases the weights itself
    assert _held(reference) == 0
    graph = OnnxDecoder(tiny_artifact(model_type) / "model.onnx")
    np.testing.assert_allclose(streamed, graph.step(seq, all_logits=True), atol=1e-4, rtol=0)


def test_streamed_recording_makes_the_cards_window_calls(tiny_dir, tiny_artifact, tmp_path):
    from slmedge.exporter.quality.streamed_reference import record_streamed_reference

    artifact = tiny_artifact("llama")
    graph = record_reference(OnnxDecoder(artifact / "model.onnx"), artifact, SETTINGS,
                             tmp_path / "graph")
    streamed = record_streamed_reference(_streamed(tiny_dir("llama")), artifact, SETTINGS,
                                         tmp_path / "streamed")
    window_calls = [c for c in graph.calls if c[1]]  # all_logits: windows and replay window
    # the graph's greedy prompts: one batch (OnnxDecoder.decode_batch), not recorded as steps
    assert len(window_calls) >= 3 and len(graph.calls) == len(window_calls)
    assert graph.batches_rows and len(graph.batch_calls) == 1 and not streamed.batch_calls
    assert [c[:2] for c in streamed.calls] == [c[:2] for c in window_calls]
    assert streamed.teacher_forced is not None
    assert "streamed layer by layer" in streamed.card_reference
    for mine, theirs in zip(streamed.calls, window_calls):
        np.testing.assert_allclose(_logits(streamed, mine), _logits(graph, theirs), atol=1e-4,
                                   rtol=0)


def _logits(recorded: RecordedReference, call) -> np.ndarray:
    _tokens, _flag, offset, shape, dtype = call
    return np.fromfile(recorded.path, dtype=np.dtype(dtype), count=int(np.prod(shape)),
                       offset=offset).reshape(shape)


def test_card_with_streamed_reference_matches_the_graph_reference(tiny_dir, tiny_artifact):
    reference_graph = tiny_artifact("llama") / "model.onnx"
    candidate_dir = tiny_artifact("llama", dtype="fp16")
    candidate = candidate_dir / "model.onnx"
    with_graph = artifact_card(candidate, candidate_dir, SETTINGS,
                               reference_model=reference_graph)
    with_streamed = artifact_card(candidate, candidate_dir, SETTINGS,
                                  reference_source=_streamed(tiny_dir("llama")))
    assert with_graph.reference == "fp32 graph"
    assert with_streamed.reference == ("PyTorch fp32 source, streamed layer by layer "
                                       "(fp32 compute)")
    assert with_streamed.perplexity == with_graph.perplexity  # the same candidate
    assert with_streamed.reference_perplexity == pytest.approx(with_graph.reference_perplexity,
                                                               rel=1e-4)
    assert with_streamed.ppl_increase_pct == pytest.approx(with_graph.ppl_increase_pct,
                                                           abs=1e-2)
    assert with_streamed.kl_mean == pytest.approx(with_graph.kl_mean, rel=1e-2, abs=1e-7)
    assert with_streamed.top1_agreement_eval == with_graph.top1_agreement_eval
    assert with_streamed.replay["reference_perplexity"] == pytest.approx(
        with_graph.replay["reference_perplexity"], rel=1e-4)
    g, s = with_graph.greedy, with_streamed.greedy
    assert s["generated_by"] == "candidate" and "generated_by" not in g
    assert (s["prompts"], s["new_tokens"]) == (g["prompts"], g["new_tokens"]) == (2, 6)
    # the first divergence is the same position whichever side generates
    assert s["first_divergence"] == g["first_divergence"]
    if g["prompts_identical"] == g["prompts"]:  # no divergence: the same tokens both ways
        assert s["top1_agreement"] == g["top1_agreement"] == 1.0
        assert s["kl_mean"] == pytest.approx(g["kl_mean"], rel=1e-2, abs=1e-7)


# -- where the streamed reference is used ---------------------------------------------------


def test_streamed_reason_keeps_small_models_on_the_graph(tiny_artifact, monkeypatch):
    from slmedge.exporter.quantize import pipeline
    from slmedge.exporter.quantize.pipeline import QualityConfig, streamed_reason
    from slmedge.runtimes.errors import UsageError

    graph = tiny_artifact("llama") / "model.onnx"
    source = object()  # only its presence matters to the choice
    assert streamed_reason(graph, QualityConfig(), source) is None  # fits: today's reference
    assert streamed_reason(graph, QualityConfig(), None) is None  # slmedge quantize: no source
    assert streamed_reason(graph, QualityConfig(reference="graph"), source) is None
    assert "asked for" in streamed_reason(graph, QualityConfig(reference="streamed"), source)
    assert streamed_reason(None, QualityConfig(), source) == "no fp32 graph was written"
    monkeypatch.setattr(pipeline, "_card_budget", lambda: (1000, "a test budget"))
    why = streamed_reason(graph, QualityConfig(), source)
    assert "needs ~" in why and "may use 0 MB here (a test budget)" in why
    with pytest.raises(UsageError, match="quantizing an fp32 artifact has no source"):
        streamed_reason(graph, QualityConfig(reference="streamed"), None)


def test_fp16_session_plan_keeps_fp16_weights_when_fp32_would_not_fit(tiny_dir, tmp_path):
    from slmedge.exporter.onnx.export import ExportConfig, _session_plan
    from slmedge.exporter.onnx.convert import weights_bytes
    from slmedge.exporter.sources.load import open_source
    from slmedge.exporter.onnx.streaming import session_weights_bytes

    streamed = open_source(str(tiny_dir("llama")), dtype="fp16")
    stored, held = weights_bytes(streamed.model), session_weights_bytes(streamed.model)
    assert held == 2 * stored

    def plan(mb):
        return _session_plan(ExportConfig(model="x", output=tmp_path, dtype="fp16",
                                          verify_session_max_mb=mb), streamed)

    assert plan(held * 1.2 / 1e6 + 0.01) == (None, None)  # the fp32 copy fits: as today
    keep, why = plan(stored * 1.2 / 1e6 + 0.01)  # only the fp16 weights fit
    assert why is None and "fp16 weights kept fp16" in keep and "would not fit the" in keep
    keep, why = plan(stored * 1.2 / 1e6 - 0.01)
    assert keep is None and "fp16 as fp32" in why and "with its fp16 weights kept fp16" in why


def test_fp16_session_plan_keeps_fp16_weights_when_fp32_copy_passes_the_headroom(
        tiny_dir, tmp_path, monkeypatch):
    from slmedge.exporter.onnx import export
    from slmedge.exporter.onnx.convert import weights_bytes
    from slmedge.exporter.sources.load import open_source

    config = export.ExportConfig(model="x", output=tmp_path, dtype="fp16",
                                 verify_session_max_mb=1e6)
    streamed = open_source(str(tiny_dir("llama")), dtype="fp16")
    stored = weights_bytes(streamed.model)
    extra = 2 * stored * 1.2 - stored  # the fp32 copy (at creation) above the file
    monkeypatch.setattr(export, "FP16_COPY_MAX_EXTRA", int(extra) + 1)
    assert export._session_plan(config, streamed) == (None, None)
    monkeypatch.setattr(export, "FP16_COPY_MAX_EXTRA", int(extra) - 1)
    keep, why = export._session_plan(config, streamed)
    assert why is None and f"would add ~{extra / 1e6:.0f} MB to the export's peak" in keep
    # an fp32 graph has no fp16 weights to keep
    fp32 = open_source(str(tiny_dir("llama")), dtype="fp32")
    assert export._session_plan(config.model_copy(update={"dtype": "fp32"}), fp32) == (None, None)


def test_keep_fp16_session_gives_the_same_logits(tiny_artifact):
    from slmedge.exporter.quality.memory import FP16_TO_FP32_FOLD, verification_session_options

    graph = tiny_artifact("llama", dtype="fp16") / "model.onnx"
    opts = verification_session_options(keep_fp16=True)
    assert opts.get_session_config_entry("optimization.disable_specified_optimizers") == \
        FP16_TO_FP32_FOLD
    seq = list(range(3, 40))
    folded = OnnxDecoder(graph, session_options=verification_session_options())
    kept = OnnxDecoder(graph, session_options=opts)
    want = folded.step(seq, all_logits=True)
    got = kept.step(seq, all_logits=True)
    # one fp16 rounding step of the logits at most (casts at run time vs folded at load)
    np.testing.assert_allclose(got, want, atol=float(np.abs(want).max()) * 2**-9, rtol=0)
    np.testing.assert_allclose(kept.step([5]), folded.step([5]),
                               atol=float(np.abs(want).max()) * 2**-9, rtol=0)


def test_unquantized_export_card_against_the_streamed_source(tiny_dir, tmp_path):
    from slmedge.exporter.pipeline import ExportConfig, run_export

    manifest = run_export(ExportConfig(
        model=str(tiny_dir("qwen2")), output=tmp_path / "out", dtype="fp16",
        quality={"eval_tokens": 96, "new_tokens": 4, "reference": "streamed"}))
    card = manifest["quality"]
    assert card["reference"] == ("PyTorch fp32 source, streamed layer by layer "
                                 "(fp32 compute)")
    # fp16 graph vs the fp32 source: close, not equal
    assert 0 < card["kl_mean"] < 1e-3 and card["top1_agreement_eval"] > 0.9
    assert abs(card["ppl_increase_pct"]) < 0.5
    assert "greedy" not in card  # windows only (an unquantized card decodes no prompts)
    assert not list((tmp_path / "out").glob(".card-reference-*"))


def test_untied_embedding_and_head_are_never_held_together(tiny_dir):
    """The head is read after the layers and the embedding dropped once it has run (an 8B's
    are 2.1 GB each in fp32); the logits stay the model's (test above)."""
    reference = _streamed(tiny_dir("llama"))  # the tiny Llama's embedding and head are untied
    model = reference.model
    head, embedding = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert head is not embedding
    seen = []
    hook = reference._layers[0].register_forward_pre_hook(
        lambda *_: seen.append((head.numel(), embedding.numel())))
    hidden = reference.hidden_states([list(range(3, 20))])
    hook.remove()
    assert seen == [(0, 0)]  # during the layers: neither
    reference.logits(hidden[0])
    assert head.numel() > 0 and embedding.numel() == 0  # the logits: the head alone
    reference.release()
    assert _held(reference) == 0
