"""The benchmark runner: statistics, schema, spread verdict, memory, the runner program."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from slmedge.runtimes.bench import runner as bench_mod
from slmedge.runtimes.bench.runner import (
    EVENT_PREFIX,
    EXIT_HANGUP,
    BenchConfig,
    bench_prompt_ids,
    peak_rss_mb,
    reset_peak_rss,
    run_bench,
    summarize,
)
from slmedge.runtimes.bench.schema import BenchResult, json_schema, validate_result
from slmedge.runtimes.errors import UsageError

SMALL = dict(prompt_tokens=16, new_tokens=12, warmup=1, repeats=3, prompt_buckets=(8, 32),
             decode_depths=(8, 64), depth_tokens=6)


@pytest.fixture(scope="module")
def tiny(tiny_artifact):
    return tiny_artifact("llama")


@pytest.fixture(scope="module")
def tiny_result(tiny):
    partials = []
    result = run_bench(tiny, BenchConfig(**SMALL), on_partial=partials.append)
    return result, partials


# -- statistics on the tiny model -----------------------------------------------------------


def test_result_validates_against_the_schema_and_keeps_the_v1_keys(tiny_result):
    result, _ = tiny_result
    r = validate_result(result)
    assert r.status == "complete" and r.rounds_done == 3 and r.phase == "done"
    for key in ("ttft_ms", "decode_tokens_per_s", "peak_rss_mb", "model_size_mb", "load_s"):
        assert isinstance(result[key], float) and result[key] > 0, key
    json.dumps(result)  # JSON-ready as is


def test_buckets_and_depths_are_all_measured_with_one_value_per_round(tiny_result):
    r = BenchResult.model_validate(tiny_result[0])
    assert [b.prompt_tokens for b in r.ttft] == [8, 16, 32]  # --prompt-tokens joins the buckets
    assert [d.depth for d in r.decode] == [8, 16, 64]
    assert [d.tokens for d in r.decode] == [6, 11, 6]  # new_tokens - 1 steps at the main prompt
    for b in r.ttft:
        s = b.ttft_ms
        assert s.n == 3 and len(s.values) == 3 and s.min <= s.median <= s.max
        assert s.spread == pytest.approx((s.max - s.min) / s.median, rel=1e-3, abs=1e-3)
        # prefill tok/s is the bucket length over each round's TTFT
        expected = sorted(b.prompt_tokens / (v / 1000) for v in s.values)
        assert sorted(b.prefill_tokens_per_s.values) == pytest.approx(expected, rel=1e-3)
    for d in r.decode:
        assert d.tokens_per_s.n == 3
        assert 0 < d.ms_p50 <= d.ms_p90 <= d.ms_p99
    main = next(d for d in r.decode if d.depth == 16)  # the main prompt's decode
    assert r.decode_tokens_per_s == main.tokens_per_s.median
    assert r.ttft_ms == next(b for b in r.ttft if b.prompt_tokens == 16).ttft_ms.median


def test_memory_and_size_are_of_this_process_and_this_artifact(tiny_result, tiny):
    r = BenchResult.model_validate(tiny_result[0])
    m = r.memory
    assert 0 < m.rss_before_load_mb <= m.peak_rss_mb
    assert m.rss_after_load_mb <= m.peak_rss_mb
    assert m.peak_rss_method == "VmHWM since bench start"
    on_disk = sum(f.stat().st_size for f in tiny.iterdir() if f.name.startswith("model.onnx"))
    assert r.model_size_mb == pytest.approx(on_disk / 1e6, abs=0.01)
    # process memory, not the machine's
    assert m.peak_rss_mb < r.environment.memory_total_mb / 4


def test_environment_is_recorded(tiny_result):
    env = BenchResult.model_validate(tiny_result[0]).environment
    import onnxruntime

    assert env.onnxruntime == onnxruntime.__version__
    assert env.providers == ["CPUExecutionProvider"] and env.threads == 2
    assert env.python == ".".join(map(str, sys.version_info[:3]))
    assert env.cpu and env.arch and env.cores.logical >= 1
    assert env.at_end is not None
    assert "node_placement" in tiny_result[0]["environment"]  # field kept for device profiles


def test_partial_results_arrive_after_load_and_each_round(tiny_result):
    _, partials = tiny_result
    assert [p["rounds_done"] for p in partials] == [0, 1, 2]
    assert all(p["status"] == "partial" for p in partials)
    for p in partials:
        validate_result(p)
    assert partials[0]["load_s"] > 0 and partials[0]["ttft"] == []


def test_lengths_beyond_the_models_context_are_skipped_with_a_warning(tiny):
    # tiny llama: max_position_embeddings 512
    r = run_bench(tiny, BenchConfig(prompt_tokens=8, new_tokens=2, warmup=0, repeats=1,
                                    prompt_buckets=(600,), decode_depths=(500,), depth_tokens=20))
    assert [b["prompt_tokens"] for b in r["ttft"]] == [8]
    assert any("600 skipped" in w for w in r["warnings"])
    assert any("500 skipped" in w for w in r["warnings"])
    assert r["stability"]["verdict"] == "unknown"
    with pytest.raises(UsageError, match="exceeds the model's context of 512"):
        run_bench(tiny, BenchConfig(prompt_tokens=500, new_tokens=20))


def test_a_capped_export_skips_lengths_past_its_cap(tiny_artifact):
    """export --max-context 48: the bench plans within the cap (the runtime would refuse)."""
    capped = tiny_artifact("llama", max_context=48)
    r = run_bench(capped, BenchConfig(prompt_tokens=8, new_tokens=2, warmup=0, repeats=1,
                                      prompt_buckets=(40, 64), decode_depths=(60,), depth_tokens=4))
    assert [b["prompt_tokens"] for b in r["ttft"]] == [8, 40]
    assert any("64 skipped" in w for w in r["warnings"])
    assert any("60 skipped" in w for w in r["warnings"])
    with pytest.raises(UsageError, match="exceeds the model's context of 48"):
        run_bench(capped, BenchConfig(prompt_tokens=40, new_tokens=9))


# -- the spread verdict, on a decoder with known timings -------------------------------------


class FakeClock:
    """The runner's ``time.perf_counter``: advanced only by :class:`TimedDecoder`'s steps, so
    the figures are exact and a busy machine cannot move them (a sleep can overshoot)."""

    now = 0.0

    @classmethod
    def perf_counter(cls) -> float:
        return cls.now


class TimedDecoder:
    """Takes a scripted time per decode step on :class:`FakeClock`: round r (0-based, warm-up
    included) takes ``base * factors[r]``; so the runner's statistics can be checked against
    known values."""

    instances: list = []

    def __init__(self, *a, base=0.002, factors=(1.0,), **kw):
        self.base, self.factors = base, factors
        self.vocab_size = 50
        self.resets = 0
        self.placement = None
        TimedDecoder.instances.append(self)

    def providers(self):
        return ["CPUExecutionProvider"]

    def reset(self):
        self.resets += 1

    def step(self, ids, all_logits=False):
        # resets per round = number of context lengths visited (3 here)
        rnd = (self.resets - 1) // 3
        FakeClock.now += self.base * self.factors[min(rnd, len(self.factors) - 1)]
        return np.zeros(self.vocab_size, dtype=np.float32)


def _bench_with(monkeypatch, tiny, factors, max_spread):
    monkeypatch.setattr("slmedge.runtimes.sessions.onnx_decoder.OnnxDecoder",
                        lambda *a, **k: TimedDecoder(factors=factors))
    monkeypatch.setattr("slmedge.runtimes.generation.time", FakeClock)
    cfg = BenchConfig(prompt_tokens=4, new_tokens=6, warmup=1, repeats=3, prompt_buckets=(2,),
                      decode_depths=(8,), depth_tokens=5, max_spread=max_spread)
    return validate_result(run_bench(tiny, cfg))


def test_decode_speed_matches_the_known_step_time(monkeypatch, tiny):
    r = _bench_with(monkeypatch, tiny, factors=(1.0,), max_spread=5.0)
    # 2 ms per step on the fake clock: 500 tok/s, whatever else the machine is doing
    for d in r.decode:
        assert d.tokens_per_s.median == pytest.approx(500)
        assert d.ms_p50 == pytest.approx(2.0)
    for b in r.ttft:
        assert b.ttft_ms.min == pytest.approx(2.0)
    assert r.stability.verdict == "ok" and r.stability.unstable == []


def test_a_wide_spread_between_rounds_is_flagged(monkeypatch, tiny):
    # measured rounds take 1x, 3x, 1x the step time (the warm-up's factor is not measured)
    r = _bench_with(monkeypatch, tiny, factors=(1.0, 1.0, 3.0, 1.0), max_spread=0.25)
    assert r.stability.verdict == "unstable"
    assert "decode_tokens_per_s@4" in r.stability.unstable
    assert "decode_tokens_per_s@8" in r.stability.unstable
    d = next(d for d in r.decode if d.depth == 4)
    assert d.tokens_per_s.spread > 0.5  # ~(500 - 167) / 500
    assert any("spread above 25%" in w for w in r.warnings)


# -- small pieces ----------------------------------------------------------------------------


def test_summarize_and_prompt_prefixes():
    s = summarize([2.0, 1.0, 4.0])
    assert (s["min"], s["median"], s["max"], s["n"]) == (1.0, 2.0, 4.0, 3)
    assert s["spread"] == 1.5 and s["values"] == [2.0, 1.0, 4.0]
    assert summarize([3.0])["spread"] == 0.0 and summarize([]) is None
    long = bench_prompt_ids(1000, 64, seed=3)
    assert bench_prompt_ids(1000, 16, seed=3) == long[:16]
    assert bench_prompt_ids(1000, 16, seed=4) != long[:16]


def test_config_rejects_nonsense():
    for bad in (dict(repeats=0), dict(warmup=-1), dict(prompt_buckets=(0,)),
                dict(max_spread=0), dict(depth_tokens=0)):
        with pytest.raises(ValueError):
            BenchConfig(**bad)
    assert BenchConfig(prompt_buckets=(512, 32, 32)).prompt_buckets == (32, 512)
    with pytest.raises(UsageError, match="unknown bench config fields"):
        BenchConfig.from_dict({"prompt_tokens": 4, "nonsense": 1})


def test_peak_rss_is_reset_to_the_current_level():
    if not reset_peak_rss():  # the mark now sits at today's level, not the session's peak
        pytest.skip("this kernel keeps VmHWM after clear_refs 5 (lifetime peak reported)")
    import mmap

    blob = mmap.mmap(-1, 60_000_000)  # +60 MB resident, above that level; munmap on close
    blob.write(b"\1" * 60_000_000)  # (a freed numpy array may stay in the allocator's arena)
    high = peak_rss_mb()
    blob.close()
    reset_peak_rss()
    assert peak_rss_mb() < high - 40


def test_schema_rejects_unknown_fields_and_other_versions(tiny_result):
    doc = dict(tiny_result[0])
    with pytest.raises(UsageError, match="version 1"):
        validate_result({**doc, "schema_version": 1})
    with pytest.raises(UsageError, match="surprise"):
        validate_result({**doc, "surprise": 1})
    with pytest.raises(UsageError, match="ttft_ms"):
        validate_result({**doc, "ttft_ms": "fast"})
    schema = json_schema()
    assert schema["properties"]["schema_version"]["const"] == 2
    assert schema["additionalProperties"] is False


# -- the runner program (what runs on a target) ----------------------------------------------


def _runner(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "slmedge.runtimes.bench.runner", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def test_runner_streams_events_and_writes_the_result(tiny, tmp_path):
    out = tmp_path / "sub dir" / "r.json"
    cfg = json.dumps({"prompt_tokens": 8, "new_tokens": 4, "warmup": 0, "repeats": 2,
                      "prompt_buckets": [8], "decode_depths": [8], "label": "x y"})
    proc = _runner(str(tiny), "--config-json", cfg, "--events", "--output", str(out))
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr.decode()
    events = [json.loads(ln[len(EVENT_PREFIX):]) for ln in stdout.decode().splitlines()
              if ln.startswith(EVENT_PREFIX)]
    kinds = [e["event"] for e in events]
    assert kinds.count("partial") == 2 and kinds[-1] == "result" and "progress" in kinds
    final = events[-1]["result"]
    assert validate_result(final).label == "x y"
    assert json.loads(out.read_text()) == final


def test_runner_stops_when_its_stdin_closes(tiny):
    # A long run; closing stdin (what sshd/adbd do when the connection drops) stops it.
    cfg = json.dumps({"prompt_tokens": 8, "new_tokens": 4, "warmup": 0, "repeats": 100000,
                      "prompt_buckets": [8], "decode_depths": [8]})
    proc = _runner(str(tiny), "--config-json", cfg, "--events", "--exit-on-stdin-eof",
                   stdin=subprocess.PIPE)
    first = proc.stdout.readline().decode()
    assert first.startswith(EVENT_PREFIX)
    proc.stdin.close()
    # 100000 rounds would take hours: ending at all, with the hang-up code and reason, is the
    # check (the timeout only keeps a broken runner from hanging the suite; no timing asserted)
    proc.wait(timeout=300)
    assert proc.returncode == EXIT_HANGUP
    assert b"stdin EOF" in proc.stderr.read()


def test_runner_reports_a_bad_artifact_as_an_error_event(tmp_path):
    proc = _runner(str(tmp_path / "missing"), "--events")
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2
    event = json.loads(stdout.decode().strip()[len(EVENT_PREFIX):])
    assert event["event"] == "error" and "does not exist" in event["message"]


def test_runner_module_imports_no_torch():
    code = ("import sys, slmedge.runtimes.bench.runner, slmedge.runtimes.bench.remote, "
            "slmedge.runtimes.bench.sysinfo; print(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('torch', 'transformers', 'pydantic')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env={**os.environ})
    # pydantic too: the runner on a Pi or phone gets onnxruntime, numpy and psutil only
    assert out.stdout.strip() == "[]", out.stderr


def test_cli_bench_keeps_its_contract(tiny, tmp_path):
    from slmedge.tools.cli.app import main

    out = tmp_path / "r.json"
    rc = main([
        "bench", str(tiny), "--prompt-tokens", "16", "--new-tokens", "4", "--threads", "1",
        "--warmup", "0", "--repeats", "2", "--prompt-buckets", "8", "--depths", "8",
        "--depth-tokens", "3", "--label", "mine", "--output", str(out),
    ])
    assert rc == 0
    r = validate_result(json.loads(out.read_text()))
    assert r.label == "mine" and r.config.threads == 1
    assert [b.prompt_tokens for b in r.ttft] == [8, 16]
    assert [(d.depth, d.tokens) for d in r.decode] == [(8, 3), (16, 3)]
    with pytest.raises(SystemExit) as exit_info:  # argparse: usage error
        main(["bench", str(tiny), "--prompt-buckets", "0"])
    assert exit_info.value.code == 2
    assert main(["bench", str(tiny), "--max-spread", "-1"]) == 2  # BenchConfig -> UsageError


def test_bench_module_has_no_leftover_defaults():
    # the defaults the README documents
    cfg = BenchConfig()
    assert (cfg.prompt_tokens, cfg.new_tokens, cfg.threads) == (128, 128, 2)
    assert cfg.prompt_buckets == (32, 128, 512) and cfg.decode_depths == (32, 128, 512)
    assert bench_mod.BENCH_SCHEMA_VERSION == 2
