"""Static-shape export (prefill + decode graphs over a fixed KV cache) vs PyTorch, and the
same graphs on the QNN HTP emulator."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import pytest
from helpers.static_fixtures import static_artifact_path

from slmedge.runtimes.artifact import open_artifact
from slmedge.runtimes.errors import UsageError
from slmedge.runtimes.manifest_schema import load_manifest
from slmedge.runtimes.sessions.static_decoder import StaticDecoder, build_bias, open_decoder

HAS_QNN = importlib.util.find_spec("onnxruntime_qnn") is not None
ATOL = 1e-4  # fp32


@pytest.fixture(scope="module")
def static_llama(tmp_path_factory, tiny_dir):
    return static_artifact_path(tmp_path_factory, tiny_dir, "llama")


def _torch_logits(hf_dir, ids):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="sdpa").eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()


def _static_logits(decoder, ids, n_prompt):
    out = [decoder.step(ids[:n_prompt], all_logits=True)]
    out += [decoder.step([t], all_logits=True) for t in ids[n_prompt:]]
    return np.concatenate(out)


def test_bias_marks_valid_slots_causal_new_tokens_and_window():
    b = build_bias(length=3, n_valid=2, chunk=4, context=6, window=None)
    allowed = b[0, 0] == 0
    assert allowed.shape == (4, 10)
    # query 0: cache slots 0-2 and itself; query 1: also new token 0
    assert allowed[0].tolist() == [1, 1, 1, 0, 0, 0, 1, 0, 0, 0]
    assert allowed[1].tolist() == [1, 1, 1, 0, 0, 0, 1, 1, 0, 0]
    # padded queries see only themselves; nobody sees padded keys
    assert allowed[2].tolist() == [0] * 8 + [1, 0] and allowed[3].tolist() == [0] * 9 + [1]
    w = build_bias(length=5, n_valid=1, chunk=1, context=6, window=3)[0, 0, 0] == 0
    assert w.tolist() == [0, 0, 0, 1, 1, 0, 1]  # positions 3, 4 and itself (5) within 3
    assert build_bias(0, 1, 1, 4, None, np.float16).dtype == np.float16


def test_static_llama_matches_pytorch(static_llama, tiny_dir):
    artifact = open_artifact(static_llama)
    decoder = open_decoder(artifact)
    assert isinstance(decoder, StaticDecoder) and decoder.context == 32 and decoder.chunk == 8
    ids = np.random.default_rng(1).integers(0, 128, 19).tolist()
    got = _static_logits(decoder, ids, n_prompt=13)  # chunks of 8 + 5 (padded), 6 decodes
    ref = _torch_logits(tiny_dir("llama"), ids)
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)
    # logits() restarts from an empty cache
    np.testing.assert_allclose(decoder.logits(ids[:9]), ref[:9], atol=ATOL, rtol=0)


def test_graph_structure_and_shared_weights(static_llama):
    manifest = json.loads((static_llama / "manifest.json").read_text())
    static = manifest["static"]
    assert static["context_length"] == 32 and static["prefill_chunk"] == 8
    prefill = onnx.load(str(static_llama / "prefill.onnx"), load_external_data=False)
    decode = onnx.load(str(static_llama / "decode.onnx"), load_external_data=False)

    def dims(model, name):
        vi = {v.name: v for v in [*model.graph.input, *model.graph.output]}[name]
        return [d.dim_value for d in vi.type.tensor_type.shape.dim]

    assert dims(prefill, "input_ids") == [1, 8] and dims(decode, "input_ids") == [1, 1]
    assert dims(prefill, "attention_bias") == [1, 1, 8, 40]
    assert dims(decode, "past_key_values.0.key") == [1, 2, 32, 16]
    assert dims(decode, "kv_new.1.value") == [1, 2, 1, 16]
    for model in (prefill, decode):  # every shape fixed: what NPUs need
        for vi in [*model.graph.input, *model.graph.output]:
            assert all(d.dim_value > 0 for d in vi.type.tensor_type.shape.dim), vi.name
        assert not [n for n in model.graph.node if n.op_type == "ScatterND"]

    def locations(model):
        return {t.name: {e.key: e.value for e in t.external_data}
                for t in model.graph.initializer if t.external_data}

    shared = locations(prefill)
    assert shared and {k: v for k, v in locations(decode).items() if k in shared} == {
        k: v for k, v in shared.items() if k in locations(decode)}
    data = (static_llama / "model.onnx.data").stat().st_size
    assert static["weights_bytes_saved_by_sharing"] >= 0.9 * data  # stored once, not twice


def test_context_window_overflow_is_a_usage_error(static_llama):
    decoder = open_decoder(open_artifact(static_llama))
    decoder.step(list(range(30)))
    with pytest.raises(UsageError, match="holds 32 tokens"):
        decoder.step([1, 2, 3])


def test_sliding_window_family_matches_pytorch(tmp_path, tiny_dir):
    """Gemma 3 mixes sliding (window 8) and full layers: two bias inputs."""
    import torch
    from transformers import AutoModelForCausalLM

    from slmedge.exporter.architectures.registry import get_spec
    from slmedge.exporter.onnx.static_shapes import export_static

    hf = tiny_dir("gemma3_text")
    model = AutoModelForCausalLM.from_pretrained(hf, attn_implementation="sdpa").eval()
    info = export_static(model, get_spec(model.config.model_type), tmp_path,
                         context_length=24, prefill_chunk=8)
    assert info.mask_inputs == {"attention_bias": None, "attention_bias_sliding": 8}
    decoder = StaticDecoder(tmp_path, info.to_manifest())
    ids = np.random.default_rng(2).integers(0, 128, 20).tolist()
    got = _static_logits(decoder, ids, n_prompt=11)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)


@pytest.mark.qnn
@pytest.mark.skipif(not HAS_QNN, reason="onnxruntime-qnn is not installed here "
                    "(wheels: Linux x86_64 / Windows, Python >= 3.11)")
def test_static_graphs_run_fully_on_qnn_htp_emulator(static_llama):
    from slmedge.device_profiles import load_profile

    profile = load_profile("android-qnn-htp")
    artifact = open_artifact(static_llama)
    htp = open_decoder(artifact, providers=profile.provider_specs(), strict=True,
                       allow_cpu_fallback=profile.runtime.allow_cpu_fallback)
    for kind, place in htp.placement.items():
        assert place.nodes_by_provider == {"QNNExecutionProvider": place.total_nodes}, kind
    cpu = open_decoder(artifact)
    ids = np.random.default_rng(3).integers(0, 128, 14).tolist()
    a, b = _static_logits(htp, ids, 10), _static_logits(cpu, ids, 10)
    cosine = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cosine.min() > 0.9999  # HTP computes fp32 graphs in fp16
    assert (a.argmax(-1) == b.argmax(-1)).all()


def test_a16w8_qdq_of_static_graphs_tracks_float_on_cpu(static_llama, tmp_path):
    """Issue 3's static QDQ with a calibration reader of the static contract: the bias path
    and the profile's float_ops stay float, weights stay shared between the two graphs."""
    import shutil

    from slmedge.exporter.quantize.recipe import QuantRecipe
    from slmedge.exporter.onnx.static_shapes_qdq import quantize_static_graphs, static_quality

    work = tmp_path / "q"
    shutil.copytree(static_llama, work)
    static = json.loads((work / "manifest.json").read_text())["static"]
    ids = np.random.default_rng(4).integers(6, 128, 400).tolist()
    report = quantize_static_graphs(work, static, QuantRecipe(scheme="a16w8"), ids,
                                    float_ops=["Softmax", "ReduceMean", "Pow", "Sqrt"])
    assert report["weights_bytes_saved_by_sharing"] > 0
    for table in report["tables"].values():
        assert table["Softmax"]["quantized"] == 0 and table["MatMul"]["quantized"] > 0
    decode = onnx.load(str(work / "decode.onnx"), load_external_data=False)
    assert any(n.op_type == "DequantizeLinear" for n in decode.graph.node)
    card = static_quality(StaticDecoder(static_llama, static), StaticDecoder(work, static),
                          ids, window=32, prompts=2, prompt_tokens=8, new_tokens=8)
    assert card.cosine_mean > 0.98, card  # 16-bit activations: close to float
    if HAS_QNN:  # the same file on the HTP emulator: placed there, its card is measurable
        from slmedge.device_profiles import load_profile

        htp = StaticDecoder(work, static, allow_cpu_fallback=True,
                            providers=load_profile("android-qnn-htp").provider_specs())
        place = htp.placement["decode"]
        assert place.nodes_by_provider["QNNExecutionProvider"] > 0.9 * place.total_nodes
        htp_card = static_quality(StaticDecoder(static_llama, static), htp, ids, window=32,
                                  prompts=1, prompt_tokens=8, new_tokens=4)
        assert np.isfinite(htp_card.cosine_mean)


def _card(candidate, reference, tiny_dir, tmp_path, **kwargs):
    from slmedge.exporter.quality.card import QualitySettings, artifact_card

    text = tmp_path / "eval.txt"
    text.write_text("the cat sat on the mat and the dog ran to the park " * 20)
    settings = QualitySettings(eval_text=text, eval_tokens=64, window=32, stride=16,
                               prompts=("the cat sat", "a dog ran"), new_tokens=6)
    return artifact_card(candidate, tiny_dir("llama"), settings, reference_model=reference,
                         **kwargs)


def test_quality_card_of_a_static_artifact_directory(static_llama, tiny_artifact, tiny_dir,
                                                     tmp_path):
    """artifact_card opens an artifact directory with its own decoder (static graphs here)
    and compares it with the dynamic fp32 graph of the same checkpoint."""
    card = _card(static_llama, tiny_artifact("llama") / "model.onnx", tiny_dir, tmp_path)
    assert card.eval["windows"] == 3 and card.greedy["prompts"] == 2
    assert abs(card.ppl_increase_pct) < 0.01 and card.kl_mean < 1e-8
    assert card.greedy["top1_agreement"] == 1.0


@pytest.mark.qnn
@pytest.mark.skipif(not HAS_QNN, reason="onnxruntime-qnn is not installed here")
def test_quality_card_on_the_qnn_htp_emulator_without_cpu_fallback(static_llama, tiny_artifact,
                                                                   tiny_dir, tmp_path):
    """The card's candidate on the profile's providers with CPU fallback off (what
    tools/bench/bench_qnn.py measures on SmolLM2); the reference stays on CPU."""
    from slmedge.device_profiles import load_profile

    profile = load_profile("android-qnn-htp")
    card = _card(static_llama, tiny_artifact("llama") / "model.onnx", tiny_dir, tmp_path,
                 providers=profile.provider_specs(), allow_cpu_fallback=False)
    assert abs(card.ppl_increase_pct) < 1.0  # HTP computes the fp32 graph in fp16
    assert card.greedy["top1_agreement"] >= 0.9


# -- the quality card of a float static export (vs PyTorch fp32) --------------------------------

#: A profile like ios-coreml (fp16, no quantization) with the tiny window; .onnx only, so no
#: ORT-format conversion in the test.
COREML_TINY = """\
name: test-coreml
extends: ios-coreml
shapes:
  context_length: 32
  prefill_chunk: 8
artifact:
  formats: [onnx]
  required_operators_config: false
"""


def _perplexity(logits: np.ndarray, ids: list[int]) -> float:
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return float(np.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean()))


def _check_card_against_pytorch(root, reference_model) -> dict:
    """The manifest's card of ``root`` vs perplexities computed here: PyTorch's (the
    reference, fp32) and the graphs' on the card's own window; returns the card."""
    import hashlib
    from pathlib import Path

    import torch

    from slmedge.runtimes.tokenizer import TextTokenizer

    manifest = json.loads((root / "manifest.json").read_text())
    card, static = manifest["quality"], manifest["static"]
    text = Path(card["eval"]["text"])
    assert hashlib.sha256(text.read_bytes()).hexdigest() == card["eval"]["text_sha256"]
    ids = TextTokenizer(root).encode(text.read_text(encoding="utf-8", errors="replace")[:50_000])
    ids = ids[:card["eval"]["tokens"]]
    assert card["eval"]["tokens"] == min(256, static["context_length"]) == len(ids)
    # the ONNX card's keys (exporter/quality/card.py), none renamed for the static flow
    assert {"tokens", "greedy_agreement", "first_divergence", "gate"}.isdisjoint(card)
    with torch.no_grad():
        ref = reference_model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    got = StaticDecoder(root, static).logits(ids).astype(np.float32)
    # The card's perplexities are not rounded; float64 sums in another order add ~1e-12.
    # A logit shift of at most d moves each token's log-probability by at most 2d.
    rounding = 1e-9 * _perplexity(ref, ids)
    ppl_ref = _perplexity(ref, ids)
    assert abs(card["reference_perplexity"] - ppl_ref) <= rounding, (card, ppl_ref)
    d = float(np.abs(got - ref).max())
    assert abs(card["perplexity"] - ppl_ref) <= ppl_ref * np.expm1(2 * d) + rounding, (card, d)
    assert abs(card["perplexity"] - _perplexity(got, ids)) <= rounding
    assert card["ppl_increase_pct"] == pytest.approx(
        100 * (card["perplexity"] / card["reference_perplexity"] - 1), rel=1e-9)
    # greedy agreement: 3 prompts, the decode graph up to the end of the window
    greedy = card["greedy"]
    n = greedy["new_tokens"]
    assert greedy["prompts"] == 3 == len(greedy["first_divergence"]) and n == 16
    assert greedy["prompt_tokens"] == 16
    assert all(0 <= f <= n for f in greedy["first_divergence"])
    assert np.mean(greedy["first_divergence"]) / n <= greedy["top1_agreement"] <= 1.0
    assert 0 <= card["kl_mean"] and card["cosine_min"] <= card["cosine_mean"] <= 1.0 + 1e-6
    # the gate is the manifest's, as a quantized ONNX export's
    assert manifest["gate"] == {"max_ppl_increase_pct": 5.0, "passed": True}
    assert load_manifest(root).gate.max_ppl_increase_pct == 5.0
    assert "quality card (manifest quality) is vs PyTorch fp32 on CPU" in \
        manifest["verification"]["device_card"]["why"]
    return card


def test_float_static_export_has_a_quality_card_vs_pytorch(static_llama, tiny_dir):
    """Every artifact gets a card: the fp32 static graphs vs the PyTorch model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"),
                                                 attn_implementation="sdpa").eval()
    card = _check_card_against_pytorch(static_llama, model)
    assert card["reference"] == "PyTorch fp32 on CPU"
    # fp32 graphs: PyTorch's greedy tokens, all of them
    assert card["greedy"]["top1_agreement"] == 1.0
    assert card["greedy"]["first_divergence"] == [16] * 3
    assert card["cosine_min"] > 0.9999 and card["kl_mean"] < 1e-8


def test_fp16_static_export_card_has_an_fp32_reference(tmp_path, tiny_dir, capsys):
    """ios-coreml exports fp16 and loads the model in fp16: the card's reference is an fp32
    copy of those weights, not PyTorch computing in fp16."""
    import torch
    from transformers import AutoModelForCausalLM

    from slmedge.tools.cli.app import main

    profile = tmp_path / "test-coreml.yaml"
    profile.write_text(COREML_TINY)
    out = tmp_path / "coreml"
    code = main(["export", "--model", str(tiny_dir("llama")), "--output", str(out),
                 "--profile", str(profile), "--json"])
    assert code == 0, capsys.readouterr().err
    model = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"), dtype=torch.float16,
                                                 attn_implementation="sdpa").eval().float()
    card = _check_card_against_pytorch(out, model)
    assert json.loads((out / "manifest.json").read_text())["recipe"]["dtype"] == "fp16"
    assert "fp32 copy of the float16 weights" in card["reference"]


def test_float_static_export_over_the_perplexity_gate_writes_nothing(tmp_path, tiny_dir,
                                                                     capsys, monkeypatch):
    """A float static graph whose card is over --max-ppl-increase fails as a quantized one
    does: exit 3, nothing written. The graphs here are fine, so the card is made worse."""
    from slmedge.exporter.onnx import static_shapes_qdq
    from slmedge.runtimes.errors import EXIT_QUALITY_GATE
    from slmedge.tools.cli.app import main

    real = static_shapes_qdq.static_quality

    def worse(*args, **kwargs):
        card = real(*args, **kwargs)
        card.perplexity = card.reference_perplexity * 1.06
        card.ppl_increase_pct = 6.0
        return card

    monkeypatch.setattr(static_shapes_qdq, "static_quality", worse)
    profile = tmp_path / "test-coreml.yaml"
    profile.write_text(COREML_TINY.replace("extends: ios-coreml", "extends: android-nnapi"))
    out = tmp_path / "gated"
    code = main(["export", "--model", str(tiny_dir("llama")), "--output", str(out),
                 "--profile", str(profile)])
    err = capsys.readouterr().err
    assert code == EXIT_QUALITY_GATE, err
    assert "quality gate failed" in err and "+6.00%" in err and "--max-ppl-increase" in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["test-coreml.yaml"]


def test_a_missing_eval_text_fails_before_the_static_export(tiny_dir, tmp_path):
    """An explicit --eval-text that does not exist is a usage error (exit 2) at once, as for
    dynamic exports, not a silent switch to the calibration text after the export."""
    from helpers.static_fixtures import TEST_PROFILE

    from slmedge.exporter.onnx.export import ExportConfig
    from slmedge.exporter.onnx.profile import run_profile_export

    profile = tmp_path / "p.yaml"
    profile.write_text(TEST_PROFILE)
    out = tmp_path / "out"
    config = ExportConfig(model=str(tiny_dir("llama")), output=out, profile=str(profile),
                          quality={"eval_text": tmp_path / "nope.txt"})
    with pytest.raises(UsageError, match="nope.txt"):
        run_profile_export(config)
    assert not out.exists()
