"""``slmedge check``: a placement report for every built-in profile, on a dynamic-shape and a
static-shape tiny export (no device needed)."""

from __future__ import annotations

import importlib.util

import pytest
from helpers.static_fixtures import static_artifact_path

from slmedge.device_profiles import builtin_names, load_profile
from slmedge.runtimes.check.placement import check_artifact

HAS_QNN = importlib.util.find_spec("onnxruntime_qnn") is not None


@pytest.fixture(scope="module")
def static_llama(tmp_path_factory, tiny_dir):
    return static_artifact_path(tmp_path_factory, tiny_dir, "llama")


@pytest.mark.parametrize("name", builtin_names())
def test_every_builtin_profile_reports_placement_of_a_dynamic_export(tiny_artifact, name):
    profile = load_profile(name)
    report = check_artifact(tiny_artifact("llama"), profile)
    doc = report.to_dict()
    assert doc["target"] == (profile.accelerator or profile.runtime.providers[0].name)
    assert len(doc["graphs"]) == 1 and doc["graphs"][0]["file"] == "model.onnx"
    for row in doc["rows"]:
        assert row["graph"] and row["op"] and row["reason"]
    if profile.accelerator in ("NnapiExecutionProvider", "CoreMLExecutionProvider"):
        g = doc["graphs"][0]
        # DESIGN.md: a dynamic-shape export is NPU-hostile; most nodes stay off the NPU.
        assert g["coverage"] < 0.5 and g["partitions"] >= 1
        assert any("not fixed" in r["reason"] for r in doc["rows"])
        assert "wants static shapes" in " ".join(doc["notes"])
    elif profile.accelerator == "QNNExecutionProvider":
        # Not placeable as a whole: HTP rejects dynamic shapes (or leaves the contrib ops of a
        # fused graph to CPU); without onnxruntime-qnn the check says what to install.
        assert not report.fully_placed
        error = doc["graphs"][0]["error"]
        if not HAS_QNN:
            assert "onnxruntime-qnn" in error
        elif error is None:
            assert any("runs on CPU" in r["reason"] for r in doc["rows"])
    else:  # CPU profiles: every node on CPU; unfused attention / norms are listed
        assert doc["graphs"][0]["nodes_by_provider"] == {
            "CPUExecutionProvider": doc["graphs"][0]["total_nodes"]}
        assert {"Softmax", "ReduceMean"} <= set(doc["ops"]) or doc["rows"] == []


@pytest.mark.parametrize("name", ["android-nnapi", "ios-coreml", "macos-coreml",
                                  "android-qnn-htp"])
def test_static_export_is_npu_friendly(static_llama, name):
    report = check_artifact(static_llama, load_profile(name))
    doc = report.to_dict()
    assert [g["file"] for g in doc["graphs"]] == ["prefill.onnx", "decode.onnx"]
    if name == "android-qnn-htp" and not HAS_QNN:
        pytest.skip("onnxruntime-qnn is not installed here (Linux x86_64 / Windows, py>=3.11)")
    for g in doc["graphs"]:
        assert g["error"] is None
        if name == "android-qnn-htp":
            assert g["coverage"] == 1.0, doc  # measured: fully offloaded on the HTP emulator
        else:
            assert g["coverage"] > 0.8, doc  # DESIGN.md: 87% NNAPI / 81% CoreML with fixed shapes
    assert not any("not fixed" in r["reason"] for r in doc["rows"])
    assert all("partitions" in n or "run in fp16 on the HTP" in n for n in doc["notes"])
    if name == "android-qnn-htp":  # float RMSNorm on the HTP is fp16: the check says so
        assert any("RMSNorms (Pow -> ReduceMean)" in n for n in doc["notes"]), doc["notes"]


def test_static_manifest_records_profile_placement_and_ort(static_llama):
    import json

    manifest = json.loads((static_llama / "manifest.json").read_text())
    assert manifest["format"] == "onnx-static"
    assert manifest["profile"]["name"] == "test-npu"
    assert manifest["profile"]["extends"] == "android-nnapi"
    assert manifest["placement"]["target"] == "NnapiExecutionProvider"
    assert manifest["placement"]["graphs"][0]["coverage"] > 0.8
    ort = manifest["ort_format"]
    assert sorted(ort["files"]) == ["decode.ort", "prefill.ort"]
    ops_config = (static_llama / ort["required_operators_config"]).read_text()
    assert "MatMul" in ops_config and "Softmax" in ops_config
    for name in ("decode.ort", "prefill.ort", "model.onnx.data", "required_operators.config"):
        assert name in manifest["files"], name
    assert manifest["verification"]["parity"]["passed"]


@pytest.mark.qnn
@pytest.mark.skipif(not HAS_QNN, reason="onnxruntime-qnn is not installed here")
def test_qnn_check_says_why_norm_and_softmax_are_not_8_bit(static_llama, tmp_path):
    """a16w8 with the profile's float_ops: no 8-bit row, and a note says which norm / Softmax
    ops stay float or 16-bit, and why."""
    import json
    import shutil

    import numpy as np

    from slmedge.exporter.quantize.recipe import QuantRecipe
    from slmedge.exporter.onnx.static_shapes_qdq import quantize_static_graphs

    work = tmp_path / "q"
    shutil.copytree(static_llama, work)
    static = json.loads((work / "manifest.json").read_text())["static"]
    ids = np.random.default_rng(5).integers(6, 128, 200).tolist()
    profile = load_profile("android-qnn-htp")
    quantize_static_graphs(work, static, QuantRecipe(scheme="a16w8"), ids,
                           float_ops=list(profile.recipe.float_ops))
    manifest = json.loads((work / "manifest.json").read_text())
    manifest["files"] = {}  # the sizes recorded for the float graphs
    (work / "manifest.json").write_text(json.dumps(manifest))
    doc = check_artifact(work, profile).to_dict()
    assert not [r for r in doc["rows"] if "8-bit QDQ" in r["reason"]], doc["rows"]
    kept = [n for n in doc["notes"] if "diverged on the HTP emulator" in n]
    assert any("Softmax x" in n and "kept in float" in n for n in kept), doc["notes"]
    # the norms' statistics are part of the residual stream a16w8 keeps float (static_shapes_qdq)
    assert any("Reciprocal x" in n and "kept in float" in n for n in kept), doc["notes"]
