"""tools/bench/bench_scale.py: the memory watchdog, row merging and the table (no export runs:
the large shapes are the benchmark's, not CI's)."""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

import pytest

if not sys.platform.startswith("linux"):
    pytest.skip("the watchdog reads /proc", allow_module_level=True)

_PATH = Path(__file__).resolve().parents[2] / "tools" / "bench" / "bench_scale.py"
_spec = importlib.util.spec_from_file_location("bench_scale", _PATH)
bench_scale = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_scale)

# a child that holds `mb` MB resident (touched pages), says so, then sleeps `sleep` seconds
HOLD = ("import sys, time; mb = int(sys.argv[1]); b = bytearray(mb << 20); "
        "b[::4096] = b'x' * len(b[::4096]); print('holding', flush=True); "
        "time.sleep(float(sys.argv[2]))")


def test_child_under_the_cap_runs_to_the_end(tmp_path):
    log = tmp_path / "log"
    r = bench_scale.run_measured([sys.executable, "-c", HOLD, "200", "0.5"], log, cap_gb=5.0,
                                 floor_gb=0.0, poll_s=0.05)
    assert r["exit_code"] == 0 and r["killed"] is None
    assert r["peak_rss_gb"] >= 0.2  # its own peak (wait4), 200 MB touched
    assert "holding" in log.read_text()


def test_child_over_the_cap_is_killed_and_the_row_says_so(tmp_path):
    r = bench_scale.run_measured([sys.executable, "-c", HOLD, "600", "120"], tmp_path / "log",
                                 cap_gb=0.3, floor_gb=0.0, poll_s=0.05)
    assert r["killed"] == "killed at cap 0.3 GB"
    assert r["exit_code"] == -9
    assert r["peak_tree_rss_gb"] >= 0.3  # rounded to 0.01 GB; the cap is what was passed


def test_the_cap_counts_grandchildren_and_kills_the_whole_group(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    parent = ("import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', sys.argv[1], "
              "'600', '120']); open(sys.argv[2], 'w').write(str(p.pid)); p.wait()")
    r = bench_scale.run_measured([sys.executable, "-c", parent, HOLD, str(pid_file)],
                                 tmp_path / "log", cap_gb=0.3, floor_gb=0.0, poll_s=0.05)
    assert r["killed"] == "killed at cap 0.3 GB"
    grandchild = int(pid_file.read_text())
    # killed with its group: gone, or a zombie awaiting its (init) reaper; SIGKILL is delivered
    # asynchronously, so look a few times before concluding
    for _ in range(100):
        try:
            state = Path(f"/proc/{grandchild}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            state = "gone"
        if state in ("gone", "Z"):
            break
        time.sleep(0.1)
    else:
        os.kill(grandchild, 9)  # do not leave it behind
    assert state in ("gone", "Z")


def test_floor_kills_when_the_machine_runs_low(tmp_path):
    # a floor above the machine's whole memory is always crossed: the reason names the floor
    huge = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9 + 1
    r = bench_scale.run_measured([sys.executable, "-c", HOLD, "10", "120"], tmp_path / "log",
                                 cap_gb=100.0, floor_gb=huge, poll_s=0.05)
    assert r["exit_code"] == -9
    assert r["killed"].startswith(f"killed: machine MemAvailable below {huge:g} GB")


def test_timeout_kills_and_the_row_says_so(tmp_path):
    r = bench_scale.run_measured([sys.executable, "-c", HOLD, "10", "120"], tmp_path / "log",
                                 cap_gb=100.0, floor_gb=0.0, poll_s=0.05, timeout_s=0.5)
    assert (r["exit_code"], r["killed"]) == (-9, "killed at timeout 0.5 s")


def _row(model, precision, tool, **kw):
    base = {"model": model, "parameters": 494_032_768, "precision": precision, "tool": tool,
            "exit_code": 0, "wall_s": 10.0, "peak_rss_gb": 2.0, "output_gb": 1.0, "killed": None}
    return {**base, **kw}


def test_merge_replaces_only_rows_measured_again():
    old = [_row("qwen2.5-0.5b", "fp16", "genai"), _row("qwen2.5-0.5b", "fp16", "slmedge")]
    new = [_row("qwen2.5-0.5b", "fp16", "slmedge", wall_s=5.0)]
    merged = bench_scale.merge_rows(old, new)
    assert [(r["tool"], r["wall_s"]) for r in merged] == [("genai", 10.0), ("slmedge", 5.0)]


def test_table_ratios_and_killed_rows():
    rows = [_row("qwen2.5-0.5b", "int4", "genai", wall_s=20.0, peak_rss_gb=4.0),
            _row("qwen2.5-0.5b", "int4", "slmedge", wall_s=30.0, peak_rss_gb=2.0),
            _row("llama-3.1-8b", "int4", "genai", parameters=8_030_261_248, exit_code=-9,
                 wall_s=50.0, peak_rss_gb=20.1, output_gb=None, killed="killed at cap 20 GB")]
    lines = bench_scale.table(rows).splitlines()
    assert lines[2] == ("| qwen2.5-0.5b | 0.49B | int4 | 30 s / 2.0 GB / 1.00 GB | "
                        "20 s / 4.0 GB / 1.00 GB | 1.50x | 0.50x |")
    assert lines[3] == ("| llama-3.1-8b | 8.03B | int4 | — | killed at cap 20 GB after 50 s "
                        "(20.1 GB) | — | — |")


def test_targets_judge_slmedge_rows_with_their_numbers():
    rows = [_row("llama-3.2-3b", "int4", "slmedge", peak_rss_gb=7.5, wall_s=300.0),
            _row("llama-3.2-3b", "int4", "genai", peak_rss_gb=19.3, wall_s=245.0),
            _row("llama-3.2-3b", "fp16", "slmedge", peak_rss_gb=9.0, output_gb=6.46),
            _row("llama-3.1-8b", "int4", "slmedge", exit_code=-9, output_gb=None,
                 killed="killed at timeout 1500 s"),
            _row("llama-3.1-8b", "int4", "genai", exit_code=-9, output_gb=None,
                 killed="killed at cap 20 GB")]
    assert bench_scale.targets(rows) == [
        "llama-3.2-3b fp16: peak 9.0 GB <= output 6.46 + 2 GB: not met",
        "llama-3.2-3b int4: peak 7.5 GB <= 8 GB: met",
        "llama-3.2-3b int4: wall 300 s <= GenAI's 245 s: not met",
        "llama-3.1-8b int4: not met, no artifact (killed at timeout 1500 s)",
    ]


def test_slmedge_phases_from_a_manifest():
    manifest = {"timings_s": {"load": 3.33, "trace": 20.0, "passes": 8.0, "write": 50.88,
                              "export": 78.88, "total": 626.55},
                "quantization": {"seconds": 144.13}, "quality": {"seconds": 320.99}}
    assert bench_scale.slmedge_phases(manifest) == {
        "load": 3.33, "trace": 20.0, "passes": 8.0, "write": 50.88, "export": 78.88,
        "quantize": 144.13, "quality_card": 320.99, "other": 79.22, "total": 626.55}


def test_slmedge_phases_count_the_exporters_own_laps_once():
    manifest = {"timings_s": {"load": 3.0, "trace": 20.0, "passes": 8.0, "write": 50.0,
                              "export": 78.0, "support_files": 1.0, "parity": 30.0,
                              "quantize_and_card": 470.0, "total": 590.0},
                "quantization": {"seconds": 150.0}, "quality": {"seconds": 320.0}}
    phases = bench_scale.slmedge_phases(manifest)
    assert phases["other"] == 8.0  # 590 - (3 + 78 + 1 + 30 + 470)
    assert (phases["quantize"], phases["quality_card"]) == (150.0, 320.0)
