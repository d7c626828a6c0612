"""The runner's figures against an outside measurement of the same work (``/usr/bin/time -v``).

Peak RSS: the runner's ``peak_rss_mb`` against the kernel's maximum resident set size of
the same process, as ``/usr/bin/time -v`` reports it.

Time: two fixed workloads that differ only in the number of decoded tokens, run as
separate processes, alternating. The difference of their wall times (process start, load
and prefill cancel out) is what the extra decode steps cost, seen from outside; the runner
says the same from its per-token timestamps (steps / tok/s summed over the rounds).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

TIME = "/usr/bin/time"


def timed_bench(artifact: Path, out: Path, *, prompt: int, new: int, repeats: int,
                threads: int) -> dict:
    """Run the runner under ``/usr/bin/time -v``; its result plus the outside figures."""
    cfg = {"prompt_tokens": prompt, "new_tokens": new, "warmup": 0, "repeats": repeats,
           "threads": threads, "prompt_buckets": [prompt], "decode_depths": [prompt]}
    proc = subprocess.run(
        [TIME, "-v", sys.executable, "-m", "slmedge.runtimes.bench", str(artifact),
         "--config-json", json.dumps(cfg), "--output", str(out)],
        capture_output=True, text=True, timeout=1800, env={**os.environ, "LC_ALL": "C"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    wall = re.search(r"Elapsed \(wall clock\) time .*: (?:(\d+):)?(\d+):([\d.]+)", proc.stderr)
    h, m, s = wall.groups()
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    result = json.loads(out.read_text())
    d = next(d for d in result["decode"] if d["depth"] == prompt)
    return {
        "wall_s": int(h or 0) * 3600 + int(m) * 60 + float(s),
        "time_maxrss_mb": rss_kb * 1024 / 1e6,
        "peak_rss_mb": result["peak_rss_mb"],
        # the runner's own account of the decode time: each round's steps / its tok/s
        "decode_s": sum(d["tokens"] / v for v in d["tokens_per_s"]["values"]),
        "decode_tokens_per_s": result["decode_tokens_per_s"],
    }


def outside_check(artifact: Path, tmp: Path, *, prompt: int, small: int, big: int, repeats: int,
                  pairs: int, threads: int) -> dict:
    """Alternate small / big workloads ``pairs`` times; compare inside and outside figures."""
    runs = {"small": [], "big": []}
    for i in range(pairs):
        for kind, new in (("small", small), ("big", big)):
            runs[kind].append(timed_bench(artifact, tmp / f"{kind}{i}.json", prompt=prompt,
                                          new=new, repeats=repeats, threads=threads))

    def med(kind, key):
        return statistics.median(r[key] for r in runs[kind])

    outside_s = med("big", "wall_s") - med("small", "wall_s")
    inside_s = med("big", "decode_s") - med("small", "decode_s")
    extra_tokens = repeats * (big - small)
    rss = [(r["peak_rss_mb"], r["time_maxrss_mb"]) for k in runs for r in runs[k]]
    return {
        "outside_extra_decode_s": round(outside_s, 3),
        "inside_extra_decode_s": round(inside_s, 3),
        "time_ratio": round(inside_s / outside_s, 4),
        "outside_decode_tokens_per_s": round(extra_tokens / outside_s, 2),
        "bench_decode_tokens_per_s": med("big", "decode_tokens_per_s"),
        "rss_pairs_mb": rss,
        "rss_worst_ratio": round(max(abs(a / b - 1) for a, b in rss), 4),
        "wall_small_s": [r["wall_s"] for r in runs["small"]],
        "wall_big_s": [r["wall_s"] for r in runs["big"]],
    }


@pytest.fixture(scope="module")
def time_tool():
    if not os.access(TIME, os.X_OK):
        pytest.fail(f"{TIME} is missing: run tools/setup.sh (it installs Debian's 'time')")
    return TIME


def test_bench_agrees_with_usr_bin_time_on_the_tiny_model(time_tool, tiny_artifact, tmp_path):
    figures = outside_check(tiny_artifact("llama"), tmp_path, prompt=8, small=2, big=400,
                            repeats=6, pairs=2, threads=1)
    print(json.dumps(figures, indent=2))
    assert figures["rss_worst_ratio"] <= 0.10, figures
    # A tiny-model step takes ~0.3 ms, so the loop's own per-token Python (outside the
    # timestamps) and a busy CI host move the ratio by >10% (0.85 seen in CI): here the
    # check is that the runner counts the right steps and time (a 2x slip fails); the 10%
    # agreement is shown on SmolLM2 below, where a step is ~50 ms.
    assert abs(figures["time_ratio"] - 1) <= 0.25, figures


@pytest.mark.slow
def test_bench_agrees_with_usr_bin_time_on_smollm2(time_tool, smollm2_artifact, tmp_path):
    """SmolLM2-135M fp32 (the session's export; SLMEDGE_SMOLLM2_ARTIFACT reuses one)."""
    artifact = smollm2_artifact
    figures = outside_check(artifact, tmp_path, prompt=128, small=8, big=72, repeats=2,
                            pairs=3, threads=2)
    print(json.dumps(figures, indent=2))
    assert figures["rss_worst_ratio"] <= 0.10, figures
    assert abs(figures["time_ratio"] - 1) <= 0.10, figures
    assert abs(figures["outside_decode_tokens_per_s"] / figures["bench_decode_tokens_per_s"]
               - 1) <= 0.10, figures
