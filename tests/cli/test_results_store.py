"""The SQLite results store: every document the CLI writes goes in and comes back unchanged;
``slmedge results`` filters; ``report --from-store``; ``compare --fail-on-regression``."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from slmedge.runtimes.bench.schema import validate_result
from slmedge.runtimes.errors import UsageError
from slmedge.runtimes.bench.results_store import ResultsStore, default_path

BENCH_FLAGS = ["--prompt-tokens", "8", "--new-tokens", "4", "--warmup", "0", "--repeats", "1",
               "--prompt-buckets", "8", "--depths", "8", "--threads", "1", "--no-record"]


def cli(*argv, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slmedge.tools.cli", *map(str, argv)],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def bench_json(tiny_artifact, tmp_path_factory):
    """A real bench result of the tiny Llama artifact (and the store it went into)."""
    tmp = tmp_path_factory.mktemp("store")
    store, out = tmp / "r.sqlite", tmp / "bench.json"
    proc = cli("bench", tiny_artifact("llama"), *BENCH_FLAGS, "-o", out, "--store", store)
    assert proc.returncode == 0, proc.stderr
    assert f"stored in {store}" in proc.stderr
    return out, store


def test_bench_result_round_trips(bench_json):
    out, store = bench_json
    written = json.loads(out.read_text())
    with ResultsStore(store) as s:
        [row] = s.query(kind="bench")
    assert row.doc == written  # the whole document, unchanged
    assert row.device == "local" and row.target == "local" and row.status == "complete"
    assert row.decode_tokens_per_s == written["decode_tokens_per_s"]
    assert row.model == "hf-llama0" or row.model.startswith("hf-llama")  # the source's name
    assert row.recipe == "fp32" and row.perplexity == written["quality"]["perplexity"]
    validate_result(row.doc)


def test_quality_card_of_export_and_quantize_round_trip(tiny_dir, tiny_artifact, tmp_path):
    store = tmp_path / "q.sqlite"
    proc = cli("export", "--model", tiny_dir("llama"), "--output", tmp_path / "fp32",
               "--store", store)
    assert proc.returncode == 0, proc.stderr
    proc = cli("quantize", tiny_artifact("llama"), "--quant", "int8", "-o", tmp_path / "i8",
               "--store", store)
    assert proc.returncode == 0, proc.stderr
    with ResultsStore(store) as s:
        rows = s.query(kind="quality")
    assert [r.artifact for r in rows] == [str(tmp_path / "fp32"), str(tmp_path / "i8")]
    for row, art in zip(rows, ("fp32", "i8"), strict=True):
        manifest = json.loads((tmp_path / art / "manifest.json").read_text())
        assert row.doc["quality"] == manifest["quality"] and row.doc["source"] == manifest["source"]
        assert row.perplexity == manifest["quality"]["perplexity"]
    assert rows[0].recipe == "fp32" and "int8" in rows[1].recipe


def test_fleet_error_and_sweep_cell_round_trip(tmp_path):
    merged = {"kind": "slmedge.fleet-bench", "started_at": "2026-12-06T10:00:00+00:00",
              "results": [], "errors": [{"device": "pi-b", "target": "ssh://pi-b",
                                         "artifact": "a", "type": "ConnectionLost",
                                         "message": "device pi-b (ssh://pi-b): lost",
                                         "partial": None}]}
    cell = {"kind": "slmedge.sweep-cell", "cell": "m1/int4/cpu", "model": "m1", "recipe": "int4",
            "profile": "cpu", "status": "complete", "finished_at": "2026-12-06T11:00:00+00:00",
            "size_mb": 1.5, "perplexity": 120.5, "decode_tokens_per_s": 900.0, "ttft_ms": 2.0,
            "bench": {"target": "local"}}
    with ResultsStore(tmp_path / "s.sqlite") as s:
        s.add_fleet(merged)
        assert s.add("sweep-cell", cell) is not None
        assert s.add("sweep-cell", cell) is None  # the same document twice is one row
        [err] = s.query(kind="fleet-error")
        [got] = s.query(kind="sweep-cell")
    assert err.doc == dict(merged["errors"][0], started_at=merged["started_at"])
    assert err.device == "pi-b" and err.status == "failed"
    assert got.doc == cell and got.model == "m1" and got.recipe == "int4"
    assert got.profile == "cpu" and got.model_size_mb == 1.5 and got.perplexity == 120.5


def test_results_command_filters_and_json(bench_json, tmp_path):
    _, store = bench_json
    proc = cli("results", "--store", store, "--json", "--recipe", "FP32", "--device", "loc")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["count"] == 1 and doc["rows"][0]["kind"] == "bench"
    assert "doc" not in doc["rows"][0]
    for flags in (["--recipe", "int4"], ["--device", "pi"], ["--since", "2999-01-01"],
                  ["--until", "2000-01-01"], ["--model", "qwen"]):
        proc = cli("results", "--store", store, "--json", *flags)
        assert json.loads(proc.stdout)["count"] == 0, flags
    today = json.loads(cli("results", "--store", store, "--json", "--full").stdout)["rows"][0]
    day = today["measured_at"][:10]
    proc = cli("results", "--store", store, "--json", "--since", day, "--until", day)
    assert json.loads(proc.stdout)["count"] == 1  # --until DATE includes that whole day
    text = cli("results", "--store", store)
    assert text.returncode == 0 and "bench" in text.stdout and "fp32" in text.stdout
    bad = cli("results", "--store", store, "--since", "yesterday")
    assert bad.returncode == 2 and "--since 'yesterday': not a date" in bad.stderr


def test_report_from_store(bench_json, tmp_path):
    _, store = bench_json
    page = tmp_path / "r.html"
    proc = cli("report", "--from-store", "--store", store, "--recipe", "fp32", "-o", page)
    assert proc.returncode == 0, proc.stderr
    assert "1 result(s)" in page.read_text()
    none = cli("report", "--from-store", "--store", store, "--recipe", "int4", "-o", page)
    assert none.returncode == 2 and "no results to draw" in none.stderr


def _scaled(src: Path, dst: Path, speed: float, latency: float) -> Path:
    """The same result with every speed x ``speed`` and every latency x ``latency``."""
    doc = json.loads(src.read_text())
    for key in ("decode_tokens_per_s", "prefill_tokens_per_s"):
        doc[key] *= speed
    for key in ("ttft_ms", "decode_ms_p50", "decode_ms_p99"):
        doc[key] *= latency
    dst.write_text(json.dumps(doc))
    return dst


@pytest.mark.parametrize("speed, latency, code", [
    (0.80, 1.25, 1),   # a 20% slowdown: decode tok/s -20%, TTFT +25%
    (0.98, 1.02, 0),   # 2% noise, inside the 5% threshold
    (1.00, 1.08, 1),   # latency alone regressing beyond 5%
])
def test_fail_on_regression(bench_json, tmp_path, speed, latency, code):
    base, _ = bench_json
    cand = _scaled(base, tmp_path / "cand.json", speed, latency)
    proc = cli("compare", "--baseline", base, cand, "--fail-on-regression", "5", "--json")
    assert proc.returncode == code, proc.stderr
    gate = json.loads(proc.stdout)["gate"]
    assert gate["passed"] is (code == 0)
    if speed < 0.9:
        figures = {r["figure"]: r["change_pct"] for r in gate["regressions"]}
        assert figures["decode_tokens_per_s"] == pytest.approx(-20.0, abs=0.01)
        assert figures["ttft_ms"] == pytest.approx(25.0, abs=0.01)
    text = cli("compare", "--baseline", base, cand, "--fail-on-regression", "5")
    assert text.returncode == code
    assert ("REGRESSION:" in text.stdout) is (code == 1)


def test_fail_on_regression_needs_a_baseline(bench_json):
    base, _ = bench_json
    proc = cli("compare", base, "--fail-on-regression", "5")
    assert proc.returncode == 2 and "needs --baseline" in proc.stderr


def test_store_location_env_and_bad_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SLMEDGE_RESULTS", str(tmp_path / "x" / "env.sqlite"))
    assert default_path() == tmp_path / "x" / "env.sqlite"
    monkeypatch.delenv("SLMEDGE_RESULTS")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_path() == tmp_path / "home" / ".cache" / "slmedge" / "results.sqlite"
    junk = tmp_path / "junk.sqlite"
    junk.write_text("not a database " * 100)
    with pytest.raises(UsageError, match="junk.sqlite: not usable as an SQLite database"):
        ResultsStore(junk)
    # the documented schema is what is on disk
    with ResultsStore(tmp_path / "s.sqlite"):
        pass
    cols = [r[1] for r in sqlite3.connect(tmp_path / "s.sqlite").execute(
        "PRAGMA table_info(results)")]
    assert cols[:3] == ["id", "kind", "stored_at"] and cols[-2:] == ["doc", "doc_sha256"]


def test_no_store_writes_nothing(tiny_artifact, tmp_path):
    store = tmp_path / "none.sqlite"
    proc = cli("bench", tiny_artifact("llama"), *BENCH_FLAGS, "--store", store, "--no-store")
    assert proc.returncode == 0, proc.stderr
    assert not store.exists() and "stored in" not in proc.stderr


def test_a_broken_store_is_a_notice_not_a_lost_measurement(tiny_artifact, tmp_path):
    junk = tmp_path / "junk.sqlite"
    junk.write_text("not a database " * 100)
    out = tmp_path / "r.json"
    proc = cli("bench", tiny_artifact("llama"), *BENCH_FLAGS, "--store", junk, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "notice: not stored: results store" in proc.stderr and "junk.sqlite" in proc.stderr
    validate_result(json.loads(out.read_text()))


def test_a_profile_exports_card_is_stored_by_profile_name(tmp_path):
    """A profile export's manifest holds its profile as a section (name, recipe, ...): the
    column keeps the name and the document keeps the section (sqlite refused the dict)."""
    manifest = {"created_at": "2026-12-06T10:00:00+00:00", "source": {"location": "m"},
                "recipe": {"dtype": "fp32", "quant": "a16w8"},
                "profile": {"name": "android-qnn-htp", "shapes": "static"},
                "quality": {"perplexity": 40.0}}
    with ResultsStore(tmp_path / "p.sqlite") as s:
        s.add_quality(manifest, artifact=str(tmp_path / "qnn"))
        (row,) = s.query(kind="quality")
    assert row.profile == "android-qnn-htp"
    assert row.doc["profile"] == manifest["profile"] and row.perplexity == 40.0
