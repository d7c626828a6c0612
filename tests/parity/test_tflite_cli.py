"""``slmedge export --format tflite`` and generate / eval / bench on a TFLite artifact.

The export tests need the [tflite] venv (tools/setup_tflite.sh); the ones that check the
messages without it run in the main venv.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from slmedge.runtimes.errors import (
    EXIT_QUALITY_GATE,
    EXIT_UNSUPPORTED,
    EXIT_USAGE,
    QualityGateFailed,
)
from slmedge.tools.cli.app import main

HAS_TFLITE = importlib.util.find_spec("litert_torch") is not None
HAS_LITERT = importlib.util.find_spec("ai_edge_litert") is not None
needs_tflite = pytest.mark.skipif(
    not HAS_TFLITE,
    reason="needs the [tflite] venv: tools/setup_tflite.sh, then "
    ".venv-tflite/bin/python -m pytest tests/parity/test_tflite*.py",
)


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.skipif(HAS_TFLITE, reason="checks the message shown when the [tflite] extra is absent")
def test_without_the_extra_the_message_says_how_to_get_it(capsys, tmp_path):
    code, out, err = run_cli(capsys, "export", "--format", "tflite", "--output", tmp_path / "a")
    assert code == EXIT_USAGE
    assert "[tflite]" in err and "setup_tflite.sh" in err
    assert out == ""


def test_tflite_only_flags_need_format_tflite(capsys, tmp_path):
    code, _, err = run_cli(capsys, "export", "--output", tmp_path / "a", "--context-length", "64")
    assert code == EXIT_USAGE
    assert "--format tflite" in err


def test_dry_run_resolves_the_tflite_config(capsys, tmp_path):
    code, out, _ = run_cli(
        capsys,
        "export",
        "--format",
        "tflite",
        "--output",
        tmp_path / "a",
        "--quant",
        "int4",
        "--prefill-chunks",
        "64,16",
        "--dry-run",
    )
    assert code == 0
    doc = json.loads(out)
    assert doc["quant"] == "int4-block32"  # the ONNX name is an alias
    assert doc["prefill_chunks"] == [16, 64] and doc["context_length"] == 1024


@pytest.mark.parametrize("flag", ["--max-kl-mean", "--min-top1-agreement"])
def test_onnx_gate_bounds_are_refused_for_tflite(capsys, tmp_path, flag):
    """The TFLite gate checks perplexity only: a KL / top-1 bound is refused, not ignored."""
    code, out, err = run_cli(capsys, "export", "--format", "tflite", "--output", tmp_path / "a",
                             "--quant", "int8", flag, "0.1", "--dry-run")
    assert code == EXIT_USAGE
    assert flag in err and "--max-ppl-increase" in err and "--format onnx" in err
    assert out == "" and not (tmp_path / "a").exists()


def test_unknown_quant_for_tflite_lists_the_choices(capsys, tmp_path):
    code, _, err = run_cli(
        capsys,
        "export",
        "--format",
        "tflite",
        "--output",
        tmp_path / "a",
        "--quant",
        "a16w8",
        "--dry-run",
    )
    assert code == EXIT_USAGE
    assert "int8-dynamic" in err and "int4-block32" in err


@needs_tflite
def test_unsupported_family_exits_4_with_the_reason(capsys, tmp_path, tiny_dir):
    code, _, err = run_cli(
        capsys,
        "export",
        "--format",
        "tflite",
        "--model",
        tiny_dir("gpt2"),
        "--output",
        tmp_path / "a",
    )
    assert code == EXIT_UNSUPPORTED
    assert "gpt2" in err and "llama" in err and "--format onnx" in err
    assert not (tmp_path / "a").exists()


@needs_tflite
def test_export_quantized_then_generate_eval_bench(capsys, tmp_path, tiny_dir):
    out = tmp_path / "int8"
    code, stdout, err = run_cli(
        capsys,
        "export",
        "--format",
        "tflite",
        "--model",
        tiny_dir("llama"),
        "--output",
        out,
        "--quant",
        "int8-dynamic",
        "--context-length",
        "64",
        "--prefill-chunks",
        "8,16",
        "--eval-tokens",
        "300",
        "--json",
        "--store",
        tmp_path / "results.sqlite",
    )
    assert code == 0, err
    manifest = json.loads(stdout)
    assert manifest["recipe"]["quant"] == "int8-dynamic"
    # the user's command as given, as the ONNX flow records it (not this process's argv)
    assert manifest["command"].startswith("slmedge export --format tflite --model ")
    # the gate is the manifest's, as a quantized ONNX export's; the card has the ONNX card's keys
    assert manifest["gate"]["passed"] is True and manifest["gate"]["max_ppl_increase_pct"] > 0
    assert "gate" not in manifest["quality"] and manifest["quality"]["greedy"]["prompts"] > 0
    # the TFLite card goes into the results store like the ONNX ones (issue 17)
    from slmedge.runtimes.bench.results_store import ResultsStore

    with ResultsStore(tmp_path / "results.sqlite") as store:
        (row,) = store.query(kind="quality")
    assert row.artifact == str(out) and row.doc["quality"] == manifest["quality"]
    assert set(manifest["tflite"]["signatures"]) == {"prefill_8", "prefill_16", "decode"}
    assert manifest["tflite"]["quantization"]["weight_bits"] == 8
    card = manifest["quality"]
    assert card["reference"].startswith("fp32 TFLite")
    assert 0.0 <= card["greedy"]["top1_agreement"] <= 1.0 and card["kl_mean"] >= 0

    code, stdout, err = run_cli(
        capsys,
        "generate",
        out,
        "--prompt",
        "The quick brown fox",
        "--max-new-tokens",
        "12",
        "--ignore-eos",
        "--json",
    )
    assert code == 0, err
    gen = json.loads(stdout)
    assert len(gen["tokens"]) == 12

    text = tmp_path / "t.txt"
    text.write_text("It is a truth universally acknowledged, that a single man " * 20)
    code, stdout, err = run_cli(
        capsys, "eval", out, "--text", text, "--window", "32", "--stride", "16", "--json"
    )
    assert code == 0, err
    assert json.loads(stdout)["perplexity"] > 1

    code, stdout, err = run_cli(
        capsys,
        "bench",
        out,
        "--prompt-tokens",
        "16",
        "--new-tokens",
        "8",
        "--warmup",
        "0",
        "--repeats",
        "1",
        "--json",
    )
    assert code == 0, err
    bench = json.loads(stdout)
    assert bench["decode_tokens_per_s"] > 0
    assert any("ai-edge-litert" in p for p in bench["environment"]["providers"])


@needs_tflite
def test_parity_gate_refuses_a_wrong_graph(tmp_path, tiny_dir, monkeypatch):
    """Nothing is written when the converted graph does not reproduce PyTorch."""
    from slmedge.exporter.tflite import export as tflite_export
    from slmedge.exporter.tflite.options import TfliteExportConfig

    real = tflite_export.convert_decoder

    def corrupted(model, spec, **kw):
        import torch

        with torch.no_grad():
            model.lm_head.weight.add_(0.5)  # the TFLite graph gets other weights than PyTorch
        data = real(model, spec, **kw)
        with torch.no_grad():
            model.lm_head.weight.sub_(0.5)
        return data

    monkeypatch.setattr(tflite_export, "convert_decoder", corrupted)
    out = tmp_path / "bad"
    config = TfliteExportConfig(
        model=str(tiny_dir("qwen2")),
        output=out,
        context_length=32,
        prefill_chunks=[8],
        quality=False,
    )
    with pytest.raises(QualityGateFailed) as err:
        tflite_export.run_tflite_export(config)
    assert err.value.exit_code == EXIT_QUALITY_GATE
    assert not out.exists() and not list(tmp_path.glob(".bad*"))


@pytest.mark.skipif(not HAS_LITERT, reason="needs ai-edge-litert ([litert] extra)")
def test_litert_runtime_imports_neither_torch_nor_tensorflow():
    code = (
        "import sys; import slmedge.runtimes.sessions.litert_decoder as m; "
        "m.load_interpreter_class('ai-edge-litert'); "
        "bad = [x for x in ('torch', 'tensorflow', 'transformers') if x in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_litert_profile_sets_sizes_recipe_and_format(capsys, tmp_path):
    """A profile with engine litert makes the export TFLite: its static shapes become the KV
    cache and the prefill chunk, its quantization the TFLite recipe, its threads the runtime's."""
    profile = tmp_path / "pixel-litert.yaml"
    profile.write_text(
        "name: pixel-litert\n"
        "extends: android-cpu\n"
        "runtime:\n  engine: litert\n  threads: 4\n"
        "  providers:\n    - name: CPUExecutionProvider\n"
        "shapes:\n  policy: static\n  context_length: 256\n  prefill_chunk: 64\n"
        "recipe:\n  precision: fp32\n  quantization: int4\n"
        "artifact:\n  formats: [tflite]\n  required_operators_config: false\n"
    )
    code, out, err = run_cli(capsys, "export", "--profile", profile, "--output", tmp_path / "a",
                             "--dry-run")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["format"] == "tflite" and doc["profile"] == "pixel-litert"
    assert doc["context_length"] == 256 and doc["prefill_chunks"] == [64]
    assert doc["quant"] == "int4-block32" and doc["threads"] == 4


@needs_tflite
def test_quantized_export_is_gated_on_perplexity(tmp_path, tiny_dir, monkeypatch):
    """Quantized recipes with the quality card on: the perplexity rise over the fp32 graph
    decides (exit 3, nothing written); the logit-step parity is recorded, not gating."""
    from slmedge.exporter.tflite import export as tflite_export
    from slmedge.exporter.tflite.options import TfliteExportConfig

    real = tflite_export._quality

    def worse(*args, **kw):  # the real card, with a rise beyond the limit
        card = real(*args, **kw)
        return {**card, "ppl_increase_pct": 12.5}

    monkeypatch.setattr(tflite_export, "_quality", worse)
    out = tmp_path / "q"
    config = TfliteExportConfig(
        model=str(tiny_dir("llama")), output=out, context_length=32, prefill_chunks=[8],
        quant="int8-dynamic", eval_tokens=120, max_ppl_increase=5.0,
    )
    with pytest.raises(QualityGateFailed, match=r"\+12.50% over the fp32 graph.*\+5%") as err:
        tflite_export.run_tflite_export(config)
    assert err.value.exit_code == EXIT_QUALITY_GATE
    assert not out.exists() and not list(tmp_path.glob(".q*"))
