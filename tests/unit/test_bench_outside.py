"""The runner's figures against an outside measurement of the same work (``/usr/bin/time -v``),
through ``tools/bench/bench_outside.py`` (how the comparison is made is in its docstring).

These tests check what a busy machine cannot move: the runner counted the steps and rounds it
was asked for, the decode time it reports fits inside the lifetime of the process that
measured it (a step counted twice on a decode-bound run does not), and its peak RSS is the
kernel's. How closely the timings agree is a measurement, printed by the tool (``python
tools/bench/bench_outside.py ARTIFACT``), never asserted here: on the shared 2-core machine
the ratio reached 1.108 and 1.26 against 10% and 25% tolerances (issue 14).
"""

from __future__ import annotations

import json
import os

import pytest

from helpers.bench_scripts import bench_outside as bo

#: Peak RSS is the same process seen twice (the runner's getrusage vs the kernel's through
#: /usr/bin/time): not a timing, it does not move with the host's load.
RSS_TOLERANCE = 0.10


@pytest.fixture(scope="module")
def time_tool():
    if not os.access(bo.TIME, os.X_OK):
        pytest.fail(f"{bo.TIME} is missing: run tools/setup.sh (it installs Debian's 'time')")
    return bo.TIME


def check_structure(figures: dict, *, small: int, big: int, repeats: int, pairs: int) -> None:
    """The facts that hold however loaded the machine is."""
    assert len(figures["runs"]["small"]) == len(figures["runs"]["big"]) == pairs
    for kind, new in (("small", small), ("big", big)):
        for run in figures["runs"][kind]:
            assert run["new_tokens"] == new
            # the first new token comes from the prefill; every later one is a timed step
            assert run["decode_steps"] == new - 1, run
            assert run["rounds"] == repeats, run
            # the runner's decode time is part of its process's wall time, seen from outside
            assert 0 < run["decode_s"] < run["wall_s"], run
    assert figures["rss_worst_ratio"] <= RSS_TOLERANCE, figures
    # The ratios are reported, not judged. They exist only when the extra decode time seen
    # from outside stands above the spread of the process wall times (on the tiny model it
    # often does not: a difference of two noisy lifetimes, once -1.2 in CI); then positive.
    resolved = figures["outside_extra_decode_s"] > figures["wall_noise_s"] and \
        figures["inside_extra_decode_s"] > 0
    assert figures["timing_resolved"] is resolved, figures
    for key in ("time_ratio", "tokens_per_s_ratio"):
        if resolved:
            assert figures[key] > 0, figures
        else:
            assert figures[key] is None and "not above" in figures["timing_note"], figures


def test_bench_agrees_with_usr_bin_time_on_the_tiny_model(time_tool, tiny_artifact, tmp_path,
                                                          capsys):
    out = tmp_path / "figures.json"
    code = bo.main([str(tiny_artifact("llama")), "--prompt", "8", "--small", "2", "--big", "40",
                    "--repeats", "3", "--pairs", "2", "--threads", "1",
                    "--workdir", str(tmp_path / "runs"), "--json", str(out)])
    assert code == 0
    figures = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == figures  # the tool prints the same JSON
    check_structure(figures, small=2, big=40, repeats=3, pairs=2)


@pytest.mark.slow
def test_bench_agrees_with_usr_bin_time_on_smollm2(time_tool, smollm2_artifact, tmp_path):
    """SmolLM2-135M fp32 (the session's export; SLMEDGE_SMOLLM2_ARTIFACT reuses one)."""
    figures = bo.outside_check(smollm2_artifact, tmp_path, prompt=128, small=8, big=72,
                               repeats=2, pairs=3, threads=2)
    print(json.dumps(figures, indent=2))
    # decode-bound (2 x 71 steps of ~50 ms are most of a big run): a step or a round counted
    # twice would put the runner's decode time past the process's whole life
    check_structure(figures, small=8, big=72, repeats=2, pairs=3)
