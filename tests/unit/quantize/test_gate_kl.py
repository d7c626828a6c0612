"""The quality gate weighs mean KL and top-1 agreement beside perplexity (issue 16).

Each criterion fails alone on a card made for it; the error names every failed criterion
with its value, its bound and its flag; ``--auto`` records which criterion made it move on;
the manifest's ``gate`` records all three bounds. The real quantizations run on the tiny
Llama (int8, 256 evaluation tokens: seconds).
"""

import json
import subprocess
import sys

import pytest

from slmedge.exporter.quantize import pipeline
from slmedge.exporter.quantize.pipeline import (
    DEFAULT_MAX_KL_MEAN,
    DEFAULT_MIN_TOP1,
    QualityConfig,
    gate_error,
    gate_failures,
    quantize_artifact,
)
from slmedge.exporter.quantize.recipe import QuantRecipe
from slmedge.runtimes.errors import QualityGateFailed

GOOD = {"ppl_increase_pct": 0.5, "kl_mean": 0.01, "top1_agreement_eval": 0.95, "perplexity": 33.2}


def _entry(card: dict, quality: QualityConfig, label="int4-x") -> dict:
    return {"label": label, **card, "failed": gate_failures(card, quality)}


@pytest.mark.parametrize("change, criterion", [
    ({"ppl_increase_pct": 5.01}, "perplexity"),
    ({"kl_mean": DEFAULT_MAX_KL_MEAN + 0.001}, "kl_mean"),
    ({"top1_agreement_eval": DEFAULT_MIN_TOP1 - 0.001}, "top1_agreement"),
])
def test_each_criterion_fails_alone(change, criterion):
    quality = QualityConfig()
    assert gate_failures(GOOD, quality) == []
    assert gate_failures({**GOOD, **change}, quality) == [criterion]


def test_bounds_are_inclusive_and_follow_the_settings():
    at_bounds = {"ppl_increase_pct": 5.0, "kl_mean": DEFAULT_MAX_KL_MEAN,
                 "top1_agreement_eval": DEFAULT_MIN_TOP1}
    assert gate_failures(at_bounds, QualityConfig()) == []
    strict = QualityConfig(max_ppl_increase=0.1, max_kl_mean=0.001, min_top1_agreement=0.99)
    assert gate_failures(GOOD, strict) == ["perplexity", "kl_mean", "top1_agreement"]


def test_measured_cards_against_the_defaults():
    """The cards the defaults were chosen from (pipeline.DEFAULT_MAX_KL_MEAN's comment)."""
    quality = QualityConfig()
    smollm2_int4 = {"ppl_increase_pct": 0.14, "kl_mean": 0.0033, "top1_agreement_eval": 0.957}
    smollm2_int8 = {"ppl_increase_pct": 0.25, "kl_mean": 0.0036, "top1_agreement_eval": 0.956}
    assert gate_failures(smollm2_int4, quality) == gate_failures(smollm2_int8, quality) == []
    # bench_quant's fast int4 (gptq-act, +4.79%): only its KL is recorded (README table)
    assert 0.071 <= quality.max_kl_mean
    gemma_int4 = {"ppl_increase_pct": -1.0, "kl_mean": 0.248, "top1_agreement_eval": 0.69}
    assert gate_failures(gemma_int4, quality) == ["kl_mean"]


def test_error_names_every_failed_criterion_value_bound_and_flag():
    quality = QualityConfig(min_top1_agreement=0.8)
    card = {**GOOD, "ppl_increase_pct": 7.5, "kl_mean": 0.248, "top1_agreement_eval": 0.69}
    err = gate_error([_entry(card, quality)], quality)
    msg = str(err)
    assert "quality gate failed: recipe int4-x does not stay" in msg
    assert "perplexity +7.50% > +5% (--max-ppl-increase)" in msg
    assert f"mean KL 0.248 > {DEFAULT_MAX_KL_MEAN:g} (--max-kl-mean)" in msg
    assert "top-1 agreement 69.0% < 80.0% (--min-top1-agreement)" in msg
    assert "--auto" in msg and "nothing was written" in msg
    assert err.figures["max_kl_mean"] == DEFAULT_MAX_KL_MEAN
    assert err.figures["min_top1_agreement"] == 0.8
    assert err.figures["tried"][0]["failed"] == ["perplexity", "kl_mean", "top1_agreement"]


def test_error_of_a_kl_failure_alone_does_not_blame_perplexity():
    quality = QualityConfig()
    err = gate_error([_entry({**GOOD, "kl_mean": 0.3}, quality)], quality)
    msg = str(err)
    assert "mean KL 0.3 > 0.15 (--max-kl-mean)" in msg
    assert "(--max-ppl-increase)" not in msg and "(--min-top1-agreement)" not in msg
    assert msg.endswith("widen the bound (--max-kl-mean)")


def test_auto_records_the_criterion_that_made_it_fall_back(monkeypatch, tmp_path):
    """--auto moves past a candidate that passes perplexity but fails KL, and the manifest's
    ``gate.tried`` says so (the ladder and the cards are stubbed: the loop is under test)."""
    cards = [{**GOOD, "kl_mean": 0.4}, {**GOOD, "top1_agreement_eval": 0.3}, GOOD]
    recipes = [QuantRecipe(scheme="int4", block_size=b) for b in (128, 64, 32)]
    monkeypatch.setattr(pipeline, "load_graph", lambda _p: None)
    monkeypatch.setattr(pipeline, "LazyWeights", lambda *_a: None)
    monkeypatch.setattr(pipeline, "split_gemms", lambda *_a: None)
    monkeypatch.setattr(pipeline, "fold_weight_transposes", lambda *_a: None)
    monkeypatch.setattr(pipeline, "analyze", lambda _m: None)
    monkeypatch.setattr(pipeline, "candidates",
                        lambda _r, _f: [(r, 1e6 * (i + 1)) for i, r in enumerate(recipes)])

    def attempt(_ref, stage, cand, _q, out_name, *_rest):
        out = stage / out_name / "model.onnx"
        out.parent.mkdir()
        out.write_bytes(b"x")
        return {"label": cand.label()}, cards[recipes.index(cand)], out

    monkeypatch.setattr(pipeline, "_attempt", attempt)
    (tmp_path / "model.onnx").write_bytes(b"fp32")
    fields = pipeline.quantize_in_stage(tmp_path, recipes[0], QualityConfig(auto=True))
    gate = fields["gate"]
    assert [t["failed"] for t in gate["tried"]] == [["kl_mean"], ["top1_agreement"], []]
    assert [t["passed"] for t in gate["tried"]] == [False, False, True]
    assert gate["tried"][0]["kl_mean"] == 0.4 and gate["tried"][1]["top1_agreement_eval"] == 0.3
    assert gate["max_kl_mean"] == DEFAULT_MAX_KL_MEAN
    assert gate["min_top1_agreement"] == DEFAULT_MIN_TOP1
    assert gate["max_ppl_increase_pct"] == 5.0
    assert (tmp_path / "model.onnx").read_bytes() == b"x"  # the passing candidate replaced it


def test_real_int8_refused_on_kl_alone_and_manifest_records_bounds(tiny_artifact, tmp_path):
    art = tiny_artifact("llama")
    recipe = QuantRecipe(scheme="int8")
    # no quantization has a mean KL of exactly 0 nats; perplexity and top-1 left wide open
    strict = QualityConfig(eval_tokens=256, max_ppl_increase=1000, max_kl_mean=0.0,
                           min_top1_agreement=0.0)
    with pytest.raises(QualityGateFailed) as e:
        quantize_artifact(art, tmp_path / "refused", recipe, strict)
    msg = str(e.value)
    assert "(--max-kl-mean)" in msg and "mean KL" in msg and "> 0 " in msg
    assert "(--max-ppl-increase)" not in msg.split("widen the bound")[0].split("last:")[1]
    assert e.value.figures["tried"][0]["failed"] == ["kl_mean"]
    assert not (tmp_path / "refused").exists()

    loose = QualityConfig(eval_tokens=256, max_ppl_increase=1000, max_kl_mean=0.5,
                          min_top1_agreement=0.25)
    manifest = quantize_artifact(art, tmp_path / "ok", recipe, loose)
    written = json.loads((tmp_path / "ok" / "manifest.json").read_text())
    for doc in (manifest, written):
        gate = doc["gate"]
        assert gate["passed"] is True
        assert gate["max_ppl_increase_pct"] == 1000 and gate["max_kl_mean"] == 0.5
        assert gate["min_top1_agreement"] == 0.25 and gate["tried"][0]["failed"] == []
    from slmedge.runtimes.manifest_schema import validate_manifest

    typed = validate_manifest(written, tmp_path / "ok" / "manifest.json").gate
    assert (typed.max_kl_mean, typed.min_top1_agreement) == (0.5, 0.25)
    card = written["quality"]
    assert gate["tried"][0]["kl_mean"] == round(card["kl_mean"], 5)
    assert gate["tried"][0]["top1_agreement_eval"] == round(card["top1_agreement_eval"], 4)


def test_cli_min_top1_agreement_flag_refuses_with_exit_3(tiny_artifact, tmp_path):
    art = tiny_artifact("llama")
    out = tmp_path / "q"
    r = subprocess.run(
        [sys.executable, "-m", "slmedge.tools.cli", "quantize", str(art), "-o", str(out),
         "--quant", "int8", "--eval-tokens", "256", "--max-ppl-increase", "1000",
         "--max-kl-mean", "10", "--min-top1-agreement", "1.0", "--json"],
        capture_output=True, text=True, timeout=600)
    error = json.loads(r.stdout)["error"]
    tried = error["figures"]["tried"]
    assert r.returncode == 3, r.stderr
    assert tried[0]["top1_agreement_eval"] < 1.0  # the seeded tiny model's int8 misses some
    assert error["type"] == "QualityGateFailed"
    assert "< 100.0% (--min-top1-agreement)" in error["message"]
    assert error["figures"]["min_top1_agreement"] == 1.0 and error["figures"]["max_kl_mean"] == 10
    assert tried[0]["failed"] == ["top1_agreement"]
    assert not out.exists()


def test_cli_dry_run_resolves_the_gate_flags(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "slmedge.tools.cli", "quantize", str(tmp_path), "-o",
         str(tmp_path / "o"), "--quant", "int4", "--max-kl-mean", "0.08",
         "--min-top1-agreement", "0.9", "--dry-run"],
        capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    quality = json.loads(r.stdout)["quality"]
    assert quality["max_kl_mean"] == 0.08 and quality["min_top1_agreement"] == 0.9
    bad = subprocess.run(
        [sys.executable, "-m", "slmedge.tools.cli", "quantize", str(tmp_path), "-o",
         str(tmp_path / "o"), "--quant", "int4", "--min-top1-agreement", "1.5", "--dry-run"],
        capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "min_top1_agreement" in bad.stderr
