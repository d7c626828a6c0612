"""``slmedge sweep``: 2 tiny models x 3 recipes on the process pool and on a local Ray cluster
(same cells, same sizes and perplexities), a re-run with one new recipe computes only its
cells, a sweep killed with SIGTERM resumes; the cells land in the results store.

The fp32 exports are shared between the runs (``export_cache``), so the module exports each
tiny model once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slmedge.exporter.sweep import load_sweep, run_sweep
from slmedge.runtimes.errors import UsageError
from slmedge.runtimes.bench.results_store import ResultsStore

RECIPES = ("  - {name: fp32}\n"
           "  - {name: int8, quant: {scheme: int8}, max_ppl_increase: 1000}\n"
           "  - {name: int4, quant: {scheme: int4}, max_ppl_increase: 1000}\n")
NEW_RECIPE = "  - {name: int4-b16, quant: {scheme: int4, block_size: 16}, max_ppl_increase: 1000}\n"
COMPARED = ("cell", "key", "model", "recipe", "profile", "status", "size_mb", "perplexity",
            "ppl_increase_pct")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("sweep")
    for mt in ("llama", "qwen2"):
        os.symlink(tiny_dir(mt), root / mt)
    return root


def write_sweep(root: Path, name: str, recipes: str = RECIPES) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(
        f"output: {name}\nexport_cache: exports\n"
        "models:\n  - {name: tllama, source: llama}\n  - {name: tqwen, source: qwen2}\n"
        f"recipes:\n{recipes}"
        "quality: {eval_tokens: 128}\n"
        "bench: {prompt_tokens: 8, new_tokens: 4, repeats: 1, warmup: 0, threads: 1, "
        "prompt_buckets: [8], decode_depths: [8]}\n"
        "resources: {workers: 2, export_memory_mb: 300, cell_memory_mb: 300}\n"
        "pick: {max_ppl_increase: 5}\n")
    return path


def _cells(summary: dict) -> list[tuple]:
    return sorted(tuple(c[k] for k in COMPARED) for c in summary["cells"])


@pytest.fixture(scope="module")
def pool_run(workdir):
    path = write_sweep(workdir, "pool")
    store = workdir / "pool.sqlite"
    proc = subprocess.run([sys.executable, "-m", "slmedge.tools.cli", "sweep", str(path),
                           "--json", "--store", str(store)], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), store, proc.stderr


def test_process_pool_sweep_cells_pareto_and_store(pool_run, workdir):
    summary, store, stderr = pool_run
    assert summary["executor"] == "process-pool" and summary["cached"] == []
    assert sorted(summary["computed"]) == sorted(
        f"{m}/{r}/default" for m in ("tllama", "tqwen") for r in ("fp32", "int8", "int4"))
    cells = {c["cell"]: c for c in summary["cells"]}
    for m in ("tllama", "tqwen"):
        fp32, i8, i4 = (cells[f"{m}/{r}/default"] for r in ("fp32", "int8", "int4"))
        assert all(c["status"] == "complete" for c in (fp32, i8, i4))
        assert i4["size_mb"] < i8["size_mb"] < fp32["size_mb"]  # smaller as bits go down
        assert fp32["ppl_increase_pct"] == 0.0 and i8["ppl_increase_pct"] is not None
        assert all(c["decode_tokens_per_s"] > 0 for c in (fp32, i8, i4))
        # each cell file holds the full quality card and bench
        doc = json.loads((workdir / "pool" / "cells" / f"{i4['key']}.json").read_text())
        assert doc["bench"]["label"] == f"{m}/int4/default" and doc["quality"]["perplexity"]
    entry = summary["pareto"]["default"]
    assert entry["pick"] in entry["front"] and "fastest" in entry["why"]
    picked = cells[entry["pick"]]
    best = min(cells[c]["perplexity"] for c in entry["front"])
    assert picked["perplexity"] <= best * 1.05
    # no front cell is beaten on all three axes by another cell
    for name in entry["front"]:
        c = cells[name]
        assert not any(o["size_mb"] <= c["size_mb"] and o["perplexity"] <= c["perplexity"]
                       and o["decode_tokens_per_s"] >= c["decode_tokens_per_s"] and o is not c
                       and (o["size_mb"], o["perplexity"], o["decode_tokens_per_s"])
                       != (c["size_mb"], c["perplexity"], c["decode_tokens_per_s"])
                       for o in cells.values())
    with ResultsStore(store) as s:
        rows = s.query(kind="sweep-cell")
    assert sorted(r.label for r in rows) == sorted(cells)
    assert {r.recipe for r in rows} == {"fp32", "int8", "int4"}


def test_rerun_with_one_new_recipe_computes_only_its_cells(pool_run, workdir):
    path = write_sweep(workdir, "pool", RECIPES + NEW_RECIPE)
    summary = run_sweep(path)
    assert sorted(summary["computed"]) == ["tllama/int4-b16/default", "tqwen/int4-b16/default"]
    assert len(summary["cached"]) == 6 and len(summary["cells"]) == 8
    before = {c[1]: c for c in _cells(pool_run[0])}
    after = {c[1]: c for c in _cells(summary)}
    assert all(after[k] == v for k, v in before.items())  # the cached cells, untouched


def test_ray_gives_the_same_cells_as_the_process_pool(pool_run, workdir, monkeypatch):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'slmedge[sweep]')")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = run_sweep(write_sweep(workdir, "ray"), ray="auto")
    finally:
        ray.shutdown()
    assert summary["executor"].startswith("ray")
    assert len(summary["computed"]) == 6
    # sizes, quality cards, keys and statuses agree; speeds are measurements, not compared
    assert _cells(summary) == _cells(pool_run[0])


def test_killed_sweep_resumes(pool_run, workdir):
    path = write_sweep(workdir, "killed")
    cells_dir = workdir / "killed" / "cells"
    proc = subprocess.Popen([sys.executable, "-m", "slmedge.tools.cli", "sweep", str(path),
                             "--no-store"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 600
        while not (cells_dir.is_dir() and any(cells_dir.glob("*.json"))):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "no cell finished in 600 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err  # interrupted
    done_before = {p.stem for p in cells_dir.glob("*.json")}
    assert 1 <= len(done_before) < 6
    for f in cells_dir.glob("*.json"):
        json.loads(f.read_text())  # every cell file whole (written to a temporary, renamed)
    summary = run_sweep(path)
    assert not list(cells_dir.glob(".*.tmp"))  # a write cut short by the kill is cleaned up
    assert len(summary["cells"]) == 6 and all(c["status"] == "complete"
                                              for c in summary["cells"])
    assert {c["key"] for c in summary["cells"] if c["cell"] in summary["cached"]} == done_before
    assert len(summary["computed"]) == 6 - len(done_before)
    assert _cells(summary) == _cells(pool_run[0])


@pytest.mark.parametrize("text, expected", [
    ("models: [{name: a, source: x}]\nrecipes: [{name: r, quant: {scheme: int3}}]\n",
     r"sweep .*bad\.yaml: field recipes\[0\] \(r\)\.quant\.scheme: the ONNX quantizer does not "
     r"offer quantization 'int3'; choose one of int4"),
    ("models: [{name: a, source: x}]\nrecipes: [{name: r}, {name: r}]\n",
     r"field recipes: names used twice: r"),
    ("models: [{name: a, source: x}]\nrecipes: [{name: r}]\nbench: {tokens: 3}\n",
     r"unknown bench config fields \['tokens'\]"),
    ("models: [{name: a, source: x}]\nrecipes: [{name: r}]\ncolour: red\n",
     r"field colour: Extra inputs are not permitted"),
])
def test_sweep_file_errors(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UsageError, match=expected):
        load_sweep(path)


def test_sweep_benches_on_a_fleet(pool_run, workdir):
    """With ``fleet:``, every cell is benched on each device (two ``local`` devices here), one
    bench at a time per device; the cell keeps each device's result and the slowest speed."""
    (workdir / "devices.yaml").write_text("devices:\n  - {name: here-a, target: local}\n"
                                        "  - {name: here-b, target: local}\n")
    path = write_sweep(workdir, "onfleet", "  - {name: fp32}\n")
    path.write_text(path.read_text() + "fleet: devices.yaml\n")
    summary = run_sweep(path)
    assert len(summary["computed"]) == 2 and summary["cached"] == []
    for c in summary["cells"]:
        doc = json.loads((workdir / "onfleet" / "cells" / f"{c['key']}.json").read_text())
        assert sorted(doc["benches"]) == ["here-a", "here-b"]
        speeds = [b["decode_tokens_per_s"] for b in doc["benches"].values()]
        assert c["status"] == "complete" and c["decode_tokens_per_s"] == min(speeds)
    # the fleet is part of a cell's inputs: the same recipe benched locally is another cell
    local = {c["key"] for c in pool_run[0]["cells"]}
    assert not local & {c["key"] for c in summary["cells"]}


def test_a_recipe_refused_by_its_gate_is_a_cell_not_an_abort(pool_run, workdir):
    path = write_sweep(workdir, "gate", "  - {name: fp32}\n"
                       "  - {name: int4-strict, quant: {scheme: int4}, max_ppl_increase: 0}\n")
    summary = run_sweep(path)
    cells = {c["cell"]: c for c in summary["cells"]}
    refused = [c for c in cells.values() if c["status"] == "gate-failed"]
    # int4 raises the tiny Qwen's perplexity (see the pool run), so a 0% gate refuses it
    pool = {c["cell"]: c for c in pool_run[0]["cells"]}
    assert pool["tqwen/int4/default"]["ppl_increase_pct"] > 0
    assert "tqwen/int4-strict/default" in {c["cell"] for c in refused}
    for c in refused:
        assert c["error"].startswith("QualityGateFailed: ") and c["cell"] not in str(
            summary["pareto"]["default"]["front"])
    assert cells["tqwen/fp32/default"]["status"] == "complete"
