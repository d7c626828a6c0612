"""``slmedge bundle`` of a TFLite artifact for a LiteRT profile, and ``slmedge verify`` of it.

Needs the [tflite] venv (tools/setup_tflite.sh); tools/test.sh runs this file in its TFLite
step. The tiny Llama, fp32, 32-token KV cache, one 8-token prefill signature, no quality card:
seconds.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest

from slmedge.tools.cli.app import main

needs_tflite = pytest.mark.skipif(
    importlib.util.find_spec("litert_torch") is None,
    reason="needs the [tflite] venv: tools/setup_tflite.sh, then "
    ".venv-tflite/bin/python -m pytest tests/parity/test_tflite_bundle.py",
)

#: Android, engine litert, the export's sizes; one thread (CI has two cores).
LITERT_PROFILE = (
    "name: pixel-litert\nextends: android-cpu\n"
    "runtime:\n  engine: litert\n  threads: 1\n  providers:\n    - name: CPUExecutionProvider\n"
    "shapes:\n  policy: static\n  context_length: 32\n  prefill_chunk: 8\n"
    "recipe:\n  precision: fp32\n  quantization: none\n"
    "artifact:\n  formats: [tflite]\n  required_operators_config: false\n"
)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def tflite_artifact(tmp_path_factory, tiny_dir) -> Path:
    from slmedge.exporter.tflite.export import run_tflite_export
    from slmedge.exporter.tflite.options import TfliteExportConfig

    out = tmp_path_factory.mktemp("tflite-bundle") / "art"
    run_tflite_export(TfliteExportConfig(model=str(tiny_dir("llama")), output=out,
                                         context_length=32, prefill_chunks=[8], quality=False,
                                         threads=1))
    return out


@pytest.fixture(scope="module")
def litert_profile(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("profiles") / "pixel-litert.yaml"
    path.write_text(LITERT_PROFILE)
    return path


@pytest.fixture(scope="module")
def tflite_bundle(tflite_artifact, litert_profile, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("b") / "litert"
    assert main(["bundle", str(tflite_artifact), "--profile", str(litert_profile), "-o", str(out),
                 "--zip", "--json"]) == 0
    return out


def manifest_of(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


@needs_tflite
def test_tflite_bundle_holds_the_tflite_and_litert_snippets(tflite_bundle, tflite_artifact):
    from importlib import metadata

    manifest = manifest_of(tflite_bundle)
    source = manifest_of(tflite_artifact)
    assert manifest["format"] == "tflite" and manifest["model_file"] == "model.tflite"
    assert manifest["files"]["model.tflite"]["role"] == "model"
    assert {"tokenizer.json", "generation_config.json"} <= set(manifest["files"])
    assert set(source["files"]) <= set(manifest["files"])
    assert manifest["genai_config"] is None and not (tflite_bundle / "genai_config.json").exists()
    assert manifest["onnx"] == {} and manifest["onnxruntime"] is None
    litert = metadata.version("ai-edge-litert")
    assert manifest["litert"]["verified_with"] == litert
    assert manifest["tflite"]["signatures"] == source["tflite"]["signatures"]

    gradle = (tflite_bundle / "snippets/android/build.gradle.kts").read_text()
    assert re.findall(r'implementation\("([\w.-]+):([\w.-]+):([\w.-]+)"\)', gradle) == [
        ("com.google.ai.edge.litert", "litert", litert)]
    assert "onnxruntime" not in gradle
    kotlin = (tflite_bundle / "snippets/android/SlmEdgeModel.kt").read_text()
    block = re.search(r"SIGNATURES = listOf\((.*?)\)", kotlin, re.S).group(1)
    assert sorted(re.findall(r'"([^"]+)"', block)) == sorted(source["tflite"]["signatures"])
    assert "setNumThreads(1)" in kotlin and "CONTEXT_LENGTH = 32" in kotlin
    listed = re.search(r"ASSET_FILES = listOf\((.*?)\)", kotlin, re.S).group(1)
    assert set(re.findall(r'"([^"]+)"', listed)) == {
        rel for rel, m in manifest["files"].items() if m["role"] != "snippet"}
    assert json.loads((tflite_bundle / "snippets/session.json").read_text())["engine"] == "litert"
    assert manifest["parity"]["runtime"].startswith("slmedge LiteRTDecoder")
    assert len(manifest["parity"]["greedy_tokens"]) == 8


@needs_tflite
def test_verify_replays_the_tflite_bundle_and_catches_a_flipped_byte(capsys, tflite_bundle,
                                                                     tmp_path):
    code, out, err = run(capsys, "verify", tflite_bundle, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["parity"]["tokens_match"] and report["parity"]["max_abs_diff"] <= 1e-5
    assert report["minimum_onnxruntime"] is None

    code, _, err = run(capsys, "verify", tflite_bundle, "--runtime-version", "1.22")
    assert code == 2 and "TFLite bundle" in err

    broken = Path(shutil.copytree(tflite_bundle, tmp_path / "copy"))
    model = broken / "model.tflite"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    code, _, err = run(capsys, "verify", broken)
    assert code == 1 and "model.tflite" in err and "sha256" in err


@needs_tflite
def test_a_tflite_artifact_is_refused_for_an_onnx_runtime_profile(capsys, tflite_artifact,
                                                                  tmp_path):
    out = tmp_path / "b"
    code, _, err = run(capsys, "bundle", tflite_artifact, "--profile", "android-cpu", "-o", out)
    assert code == 2
    assert "TFLite artifact" in err and "litert" in err
    assert not out.exists()
