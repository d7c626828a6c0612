"""tools/bench/bench_quant.py's held-out columns (issue 16), on the tiny Llama's int8: the
card is computed on the held-out text, not the evaluation text, against the fp32 graph."""

import json

from slmedge.exporter.quality.card import QualitySettings, artifact_card
from slmedge.exporter.quantize.pipeline import QualityConfig, quantize_artifact
from slmedge.exporter.quantize.recipe import QuantRecipe
from slmedge.tools.bench import bench_quant


def test_heldout_text_is_a_separate_readable_book():
    held = bench_quant.HELDOUT_TEXT.read_text(encoding="utf-8")
    assert 150_000 <= len(held.encode()) <= 300_000
    assert held.startswith("Chapter 1\n\nSir Walter Elliot, of Kellynch Hall")
    from slmedge.exporter.quality.card import DEFAULT_EVAL_TEXT

    evaluation = DEFAULT_EVAL_TEXT.read_text(encoding="utf-8")
    # no paragraph of the held-out book occurs in the evaluation text
    assert not any(p in evaluation for p in held.split("\n\n")[1:50] if len(p) > 80)


def test_heldout_quality_scores_the_heldout_text_against_fp32(tiny_artifact, tmp_path):
    fp32 = tiny_artifact("llama")
    q = tmp_path / "int8"
    quantize_artifact(fp32, q, QuantRecipe(scheme="int8"),
                      QualityConfig(eval_tokens=256, max_ppl_increase=1000))
    row = bench_quant.heldout_quality(q / "model.onnx", fp32 / "model.onnx", fp32,
                                      bench_quant.HELDOUT_TEXT, 256)
    assert set(row) == {"heldout_perplexity", "heldout_reference_perplexity",
                        "heldout_ppl_increase_pct", "heldout_kl_mean", "heldout_top1_agreement"}
    # the reference figure is fp32's own perplexity on the held-out text...
    own = artifact_card(fp32 / "model.onnx", fp32,
                        QualitySettings(eval_text=bench_quant.HELDOUT_TEXT, eval_tokens=256,
                                        prompts=()))
    assert row["heldout_reference_perplexity"] == round(own.perplexity, 3)
    # ...which is not its perplexity on the evaluation text (another text was read)
    card = json.loads((q / "manifest.json").read_text())["quality"]
    assert round(card["reference_perplexity"], 3) != row["heldout_reference_perplexity"]
    assert 0 < row["heldout_kl_mean"] < 0.5 and 0 < row["heldout_top1_agreement"] <= 1
    expected = (row["heldout_perplexity"] / row["heldout_reference_perplexity"] - 1) * 100
    assert abs(row["heldout_ppl_increase_pct"] - expected) < 0.01


def test_quality_only_run_writes_rows_without_speed(tiny_artifact, tmp_path):
    """--skip-speed --no-genai (the ablation's runs): slmedge rows only, no decode fields, the
    held-out columns and the load average present, artifacts under --workdir."""
    fp32 = tiny_artifact("llama")
    out = tmp_path / "rows.json"
    assert bench_quant.main(["--fp32", str(fp32), "--variants", "int8", "--skip-speed",
                             "--no-genai", "--open-gate", "--workdir", str(tmp_path),
                             "--eval-tokens", "256", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert (row["variant"], row["tool"]) == ("int8", "slmedge")
    assert "decode_tok_s" not in row and "load_average_rounds" not in row
    assert len(row["load_average"]) == 3
    assert row["path"] == str(tmp_path / "slmedge-q-int8")
    assert "--max-kl-mean" in row["flags"]  # --open-gate appended the open bounds
    assert 0 < row["heldout_top1_agreement"] <= 1 and "ppl_increase_pct" in row
