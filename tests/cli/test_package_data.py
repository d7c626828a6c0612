"""The texts shipped in the package, and quantized exports that fail before any heavy step
when a text they need is missing (issue 14)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import slmedge.runtimes
from slmedge.exporter.onnx import export as export_module
from slmedge.exporter.onnx import profile as profile_export
from slmedge.exporter.quality import card as quality
from slmedge.exporter.quantize import calibration, pipeline
from slmedge.runtimes.texts import default_calibration_text, default_eval_text
from slmedge.tools.cli.app import main

PACKAGE = Path(slmedge.runtimes.__file__).parent


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_packaged_texts_are_two_books_inside_the_package_with_their_sources():
    eval_text, calib_text = default_eval_text(), default_calibration_text()
    for path in (eval_text, calib_text):
        assert path.is_file() and path.stat().st_size > 50_000
        assert path.resolve().is_relative_to(PACKAGE.resolve())
    assert eval_text.read_text(encoding="utf-8")[:2000] != calib_text.read_text(encoding="utf-8")[:2000]
    assert "Mansfield Park" in eval_text.read_text(encoding="utf-8")
    assert "Emma Woodhouse" in calib_text.read_text(encoding="utf-8")
    sources = (PACKAGE / "data" / "SOURCES.md").read_text(encoding="utf-8")
    for fact in (eval_text.name, calib_text.name, "#141", "#158", "Jane Austen",
                 "public domain"):
        assert fact in sources
    # the library's defaults are the packaged files, not a path into a repository checkout
    assert quality.DEFAULT_EVAL_TEXT == eval_text
    assert calibration.DEFAULT_CALIBRATION_TEXT == calib_text
    assert "shared" not in eval_text.parts and "shared" not in calib_text.parts


def test_eval_without_text_scores_the_packaged_text(capsys, tiny_artifact):
    code, stdout, _ = run(capsys, "eval", tiny_artifact("llama"), "--max-tokens", "128",
                          "--window", "64", "--stride", "32", "--json")
    assert code == 0
    doc = json.loads(stdout)
    assert Path(doc["text"]) == default_eval_text()
    assert doc["tokens"] == 128 and doc["perplexity"] > 1


@pytest.fixture
def no_model_load(monkeypatch):
    """Any attempt to load the source model or read the artifact fails the test: the checks
    must come before the heavy steps."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the model was loaded before the texts were checked")

    patched = [(module, name) for module in (export_module, profile_export)
               for name in ("load_source", "open_source") if hasattr(module, name)]
    assert (export_module, "open_source") in patched or (export_module, "load_source") in patched
    for module, name in patched:
        monkeypatch.setattr(module, name, refuse)
    monkeypatch.setattr(pipeline, "open_artifact", refuse)
    return calls


@pytest.mark.parametrize("extra, fragments", [
    (["--quant", "int4", "--eval-text", "{missing}"],
     ["evaluation text", "missing.txt", "not found"]),
    (["--quant", "int4", "--algorithm", "gptq-act", "--calibration", "{missing}"],
     ["calibration text", "missing.txt", "--calibration"]),
    (["--quant", "int4", "--lm-head", "int4", "--lm-head-int8-tokens", "64", "--calibration",
      "{missing}"], ["calibration text", "missing.txt"]),
    (["--quant", "int4", "--eval-text", "{empty}"], ["evaluation text", "empty.txt", "is empty"]),
    # a static-shape NPU profile (a16w8 QDQ) calibrates: checked before its export too
    (["--profile", "android-qnn-htp", "--quant", "a16w8", "--calibration", "{missing}"],
     ["calibration text", "missing.txt"]),
])
def test_export_with_a_missing_text_is_a_usage_error_before_the_export(
        capsys, tmp_path, no_model_load, extra, fragments):
    (tmp_path / "empty.txt").write_text("")
    names = {"missing": tmp_path / "missing.txt", "empty": tmp_path / "empty.txt"}
    argv = [a.format(**names) for a in extra]
    out = tmp_path / "q4"
    code, _, err = run(capsys, "export", "--model", "any-model-dir", "--output", out, *argv)
    assert code == 2, err
    for fragment in fragments:
        assert fragment in err
    assert no_model_load == [] and not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".q4.")] == []


@pytest.mark.parametrize("quant", [
    ["--quant", "int8-static"], ["--quant", "a16w8"], ["--quant", "int4", "--algorithm", "gptq"],
    ["--quant", "int4", "--algorithm", "gptq-act"],
    ["--quant", "int4", "--lm-head", "int4", "--lm-head-int8-tokens", "64"],
    ["--quant", "int4", "--auto"],
])
def test_recipes_that_calibrate_need_the_packaged_calibration_text(
        capsys, tmp_path, monkeypatch, no_model_load, quant):
    """With the packaged calibration text gone (an incomplete install), every recipe that reads
    it stops at once with exit 2 naming the file; plain int4 (HQQ, no data) is not refused."""
    gone = tmp_path / "gone" / "calib_emma.txt"
    monkeypatch.setattr(calibration, "DEFAULT_CALIBRATION_TEXT", gone)
    code, _, err = run(capsys, "quantize", tmp_path / "fp32", *quant, "-o", tmp_path / "q")
    assert code == 2, err
    assert str(gone) in err and "--calibration" in err
    pipeline.check_quant_texts(
        pipeline.QuantRecipe(scheme="int4"), pipeline.QualityConfig())  # no calibration read


def test_quantized_export_without_the_packaged_eval_text_fails_early(
        capsys, tmp_path, monkeypatch, no_model_load):
    gone = tmp_path / "gone" / "eval_mansfield_park.txt"
    monkeypatch.setattr(quality, "DEFAULT_EVAL_TEXT", gone)
    monkeypatch.setattr(pipeline, "DEFAULT_EVAL_TEXT", gone)
    code, _, err = run(capsys, "export", "--model", "m", "--output", tmp_path / "q4",
                       "--quant", "int4")
    assert code == 2
    assert "evaluation text" in err and str(gone) in err and "--eval-text" in err


@pytest.mark.parametrize("recipe, fused", [
    ({"scheme": "int4", "algorithm": "gptq-act"}, True),
    ({"scheme": "int4", "algorithm": "gptq"}, False),  # ORT's GPTQ fails on fused graphs
    ({"scheme": "int4", "lm_head": "int4", "lm_head_int8_tokens": 64}, True),
    ({"scheme": "int8-static"}, False),
    ({"scheme": "a16w8"}, False),
])
def test_every_recipe_that_calibrates_reads_the_packaged_text_by_default(
        tiny_artifact, tmp_path, recipe, fused):
    """No calibration flag: the manifest names the packaged Emma as the text it calibrated on."""
    art = tiny_artifact("llama", fuse=fused)
    quality_cfg = pipeline.QualityConfig(max_ppl_increase=1e6, eval_tokens=256, new_tokens=4)
    manifest = pipeline.quantize_artifact(art, tmp_path / "q", pipeline.QuantRecipe(**recipe),
                                          quality_cfg)
    calib = manifest["quantization"]["calibration"]
    assert calib["text"] == str(default_calibration_text())
    assert calib["tokens_available"] > 10_000  # the whole book, tokenized
    assert manifest["quality"]["perplexity"] > 1  # scored on the packaged evaluation text
