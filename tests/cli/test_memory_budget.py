"""A profile's device.ram_budget_mb: weights + KV cache + runtime, checked by check / bench /
bundle (a warning; --strict refuses with exit 4 before any work)."""

from __future__ import annotations

import json

import pytest

from slmedge.device_profiles import load_profile
from slmedge.runtimes.artifact import open_artifact
from slmedge.runtimes.errors import EXIT_OK, EXIT_UNSUPPORTED
from slmedge.runtimes.check.memory_budget import (
    DEFAULT_DYNAMIC_CONTEXT, RUNTIME_ALLOWANCE_MB, estimate_memory,
)
from slmedge.tools.cli.app import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _profile(tmp_path, budget_mb: int, name: str = "tight") -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"extends: x86-cpu\nname: {name}\ndevice:\n  os: linux\n  arch: x86_64\n"
                    f"  ram_budget_mb: {budget_mb}\n")
    return str(path)


@pytest.fixture(scope="module")
def llama(tiny_artifact):
    return tiny_artifact("llama")


def test_estimate_adds_weights_kv_cache_and_runtime(llama, tmp_path):
    art = open_artifact(llama)
    arch = art.manifest["architecture"]
    profile = load_profile(_profile(tmp_path, 4000))
    est = estimate_memory(art, profile)
    # fp32 KV cache: key + value per layer, kv_heads x head_dim floats each
    per_token = 2 * arch["num_layers"] * arch["kv_heads"] * arch["head_dim"] * 4
    assert est.kv_bytes_per_token == per_token
    # the tiny config's max_position_embeddings (512) caps the dynamic default (4096)
    assert est.context == 512 < DEFAULT_DYNAMIC_CONTEXT and "512" in est.context_from
    assert est.kv_cache_mb == pytest.approx(per_token * 512 / 1e6, abs=0.05)
    model_bytes = sum((art.root / rel).stat().st_size for rel, meta in art.files.items()
                      if meta["role"] == "model")
    assert est.weights_mb == pytest.approx(model_bytes / 1e6, abs=0.05)
    assert est.total_mb == pytest.approx(est.weights_mb + est.kv_cache_mb + RUNTIME_ALLOWANCE_MB)
    assert est.fits
    longer = estimate_memory(art, profile, context=2048)
    assert longer.context == 2048 and longer.context_from == "--context"
    assert longer.kv_cache_mb == pytest.approx(4 * est.kv_cache_mb, rel=1e-3)


def test_check_reports_memory_and_strict_refuses_over_budget(llama, tmp_path, capsys):
    roomy = _profile(tmp_path, 4000, "roomy")
    code, out, _ = run(capsys, "check", str(llama), "--profile", roomy, "--json", "--strict")
    doc = json.loads(out)
    assert doc["memory"]["fits"] is True and doc["memory"]["budget_mb"] == 4000

    tight = _profile(tmp_path, 100)  # below the 150 MB runtime allowance alone
    code, out, err = run(capsys, "check", str(llama), "--profile", tight, "--json")
    doc = json.loads(out)
    assert code == EXIT_OK and doc["memory"]["fits"] is False
    assert any("over by" in n and "100 MB budget" in n for n in doc["notes"])
    code, out, err = run(capsys, "check", str(llama), "--profile", tight, "--strict")
    assert code == EXIT_UNSUPPORTED
    assert "memory budget" in err and "--quant int4" in out


def test_bench_warns_and_strict_refuses_before_running(llama, tmp_path, capsys, monkeypatch):
    import slmedge.runtimes.bench.runner as bench

    def must_not_run(*_a, **_k):
        raise AssertionError("the bench ran although --strict refused the memory budget")

    monkeypatch.setattr(bench, "run_bench", must_not_run)
    tight = _profile(tmp_path, 100)
    code, _, err = run(capsys, "bench", str(llama), "--profile", tight, "--strict",
                       "--context", "64")
    assert code == EXIT_UNSUPPORTED
    assert "error: memory on tight" in err and "64 tokens, --context" in err


def test_bundle_strict_refuses_over_budget(llama, tmp_path, capsys):
    tight = _profile(tmp_path, 100)
    out = tmp_path / "bundle"
    code, _, err = run(capsys, "bundle", str(llama), "--profile", tight, "-o", str(out),
                       "--strict")
    assert code == EXIT_UNSUPPORTED and "over by" in err and not out.exists()


def test_check_counts_the_weights_of_a_static_export_with_ort_files_once(
        tmp_path_factory, tiny_dir, capsys):
    """A profile export's .ort files hold the graphs' weights again (a device loads one or the
    other): ``slmedge check`` counts the .onnx graphs + data only, as the export recorded."""
    from helpers.static_fixtures import static_artifact_path

    artifact = static_artifact_path(tmp_path_factory, tiny_dir)
    capsys.readouterr()  # the export's own --json, when this test made it
    manifest = json.loads((artifact / "manifest.json").read_text())
    ort = manifest["ort_format"]["files"]
    assert sorted(ort) == ["decode.ort", "prefill.ort"]
    size = {rel: (artifact / rel).stat().st_size for rel, meta in manifest["files"].items()
            if meta["role"] == "model"}
    onnx_bytes = sum(v for rel, v in size.items() if rel not in ort)
    assert set(ort) <= set(size) and onnx_bytes < sum(size.values())
    code, out, _ = run(capsys, "check", str(artifact), "--profile",
                       str(artifact.parent / "test-npu.yaml"), "--json")
    weights = json.loads(out)["memory"]["weights_mb"]
    assert code == EXIT_OK and weights == pytest.approx(onnx_bytes / 1e6, abs=0.05)
    assert weights == manifest["placement"]["memory"]["weights_mb"]  # the export's estimate
    # a bundle in ORT format has no .onnx graph: both .ort files are loaded, both count
    only_ort = open_artifact(artifact)
    only_ort.files = {rel: meta for rel, meta in only_ort.files.items()
                      if rel in ort or meta["role"] != "model"}
    assert only_ort.file_size_mb() == pytest.approx(
        sum(size[rel] for rel in ort) / 1e6)


def test_a_capped_export_is_estimated_at_its_cap(tiny_artifact, tmp_path):
    """An export capped with --max-context (below the dynamic default and the model's 512) is
    estimated at the cap: it runs no longer sequence."""
    art = open_artifact(tiny_artifact("llama", max_context=48))
    est = estimate_memory(art, load_profile(_profile(tmp_path, 4000)))
    assert est.context == 48 and "--max-context 48" in est.context_from
