"""A profile's device.ram_budget_mb: weights + KV cache + runtime, checked by check / bench /
bundle (a warning; --strict refuses with exit 4 before any work)."""

from __future__ import annotations

import json

import pytest

from slmedge.device_profiles import load_profile
from slmedge.runtimes.artifact import open_artifact
from slmedge.runtimes.errors import EXIT_OK, EXIT_UNSUPPORTED
from slmedge.runtimes.memory_budget import (
    DEFAULT_DYNAMIC_CONTEXT, RUNTIME_ALLOWANCE_MB, estimate_memory,
)
from slmedge.tools.cli import main


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
    import slmedge.runtimes.bench as bench

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
