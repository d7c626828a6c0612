"""tools/bench/bench_card_batch.py on the tiny Llama: both modes run, alternate, and agree."""

from __future__ import annotations

import json

from helpers.bench_scripts import load_bench_script


def test_bench_card_batch_compares_the_modes_on_one_session(tiny_artifact, tmp_path, capsys):
    bench = load_bench_script("bench_card_batch")
    out = tmp_path / "card_batch.json"
    assert bench.main([str(tiny_artifact("llama")), "--rounds", "2", "--new-tokens", "5",
                       "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["same_tokens"] is True and result["logits_max_abs_diff"] == 0.0
    assert result["prompts"] == 6 and result["new_tokens"] == 5
    # the two modes alternate: batched first in round 1, one at a time first in round 2
    assert [list(r)[:2] for r in result["rounds"]] == [["batched_s", "one_at_a_time_s"],
                                                       ["one_at_a_time_s", "batched_s"]]
    assert len(result["loadavg_start"]) == 3


def test_bench_card_batch_refuses_a_graph_that_cannot_batch(tiny_artifact):
    import pytest

    bench = load_bench_script("bench_card_batch")
    with pytest.raises(SystemExit, match="cannot batch rows"):
        bench.main([str(tiny_artifact("llama", fuse=False)), "--rounds", "1"])
