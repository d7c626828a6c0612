"""The benchmark runner: load time, TTFT, decode speed and latency, memory, size (no torch).

One process, one artifact. The prompt is a fixed pseudo-random token sequence (same
seed -> same ids; a shorter prompt is a prefix of a longer one), so other tools can be
fed the very same prompt; generation never stops early (stop tokens are ignored) so
every run decodes the same number of tokens.

What one run measures (the result is a JSON document, schema in ``bench/schema.py``)::

    load            once: session creation time, RSS before / after
    per round       (warm-up rounds first, then ``repeats`` measured rounds)
      for each context length L in  prompt_buckets | decode_depths | {prompt_tokens}:
        prefill L tokens -> first token        TTFT(L), prefill tok/s   (L in buckets)
        then decode n tokens one by one        per-token latency        (L in depths)
                                               n = new_tokens at L = prompt_tokens,
                                                   depth_tokens elsewhere
    peak RSS        this process's high-water mark (VmHWM reset at the start, Linux)

Rounds interleave the lengths, so slow drift (heat, a neighbour process) hits every
figure alike instead of one bucket. Each figure is reported as min / median / max
over the rounds, with its spread ``(max - min) / median``; a spread above
``max_spread`` marks the result unstable.

Run it as a program (this is what ``slmedge bench --target`` runs on a Pi or phone)::

    python -m slmedge.runtimes.bench.runner ARTIFACT [--prompt-tokens 128] [--output r.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from slmedge.runtimes.artifact import MANIFEST_NAME, open_artifact
from slmedge.runtimes.errors import EXIT_ERROR, SlmEdgeError, UsageError
from slmedge.runtimes.generation import generate

BENCH_SCHEMA_VERSION = 2
#: Lines a runner started with ``--events`` writes on stdout: this prefix, then one JSON object.
EVENT_PREFIX = "@@slmedge-bench "
#: Exit code of a runner that stopped because its controlling connection went away.
EXIT_HANGUP = 129


@dataclass(frozen=True)
class BenchConfig:
    """What to measure: prompt length, tokens to generate, threads, warm-up and repeats,
    the prompt-length buckets for TTFT, the context depths for decode latency."""

    prompt_tokens: int = 128
    new_tokens: int = 128
    threads: int = 2
    warmup: int = 1
    repeats: int = 3
    seed: int = 0
    prompt_buckets: tuple[int, ...] = (32, 128, 512)
    decode_depths: tuple[int, ...] = (32, 128, 512)
    depth_tokens: int = 32
    max_spread: float = 0.10
    label: str | None = None

    def __post_init__(self):
        for name in ("prompt_tokens", "new_tokens", "repeats", "depth_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.max_spread <= 0:
            raise ValueError(f"max_spread must be > 0, got {self.max_spread}")
        for name in ("prompt_buckets", "decode_depths"):
            values = tuple(int(v) for v in getattr(self, name))
            if any(v < 1 for v in values):
                raise ValueError(f"{name} must all be >= 1 token, got {values}")
            object.__setattr__(self, name, tuple(sorted(set(values))))

    def lengths(self) -> list[int]:
        """Every context length a round visits, shortest first."""
        return sorted({self.prompt_tokens, *self.prompt_buckets, *self.decode_depths})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["prompt_buckets"] = list(self.prompt_buckets)
        d["decode_depths"] = list(self.decode_depths)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> BenchConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise UsageError(f"unknown bench config fields {unknown}; known: "
                             f"{sorted(cls.__dataclass_fields__)}")
        for name in ("prompt_buckets", "decode_depths"):
            if name in known:
                known[name] = tuple(known[name])
        return cls(**known)


def bench_prompt_ids(vocab_size: int, n: int, seed: int = 0) -> list[int]:
    """The benchmark prompt: ``n`` ids drawn uniformly from the vocabulary with ``seed``.

    For one seed, the prompt of length ``k`` is the prefix of the prompt of length ``n > k``.
    """
    return np.random.default_rng(seed).integers(0, vocab_size, size=n).tolist()


# -- memory --------------------------------------------------------------------------------


def rss_mb() -> float:
    """Current resident memory of this process, in MB (10^6 bytes). Linux and Android read
    ``/proc/self/statm`` (the figure psutil reports, without psutil's ~1 MB resident before
    the load is measured)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except (OSError, ValueError, IndexError):
        import psutil

        return psutil.Process().memory_info().rss / 1e6


def reset_peak_rss() -> bool:
    """Reset this process's resident high-water mark (Linux ``clear_refs`` 5).

    So that a benchmark's peak is its own, not that of earlier work in the same process.
    Returns False where the kernel does not allow it (then the lifetime peak is reported).
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    # Some kernels (sandboxes such as gVisor) accept the write and keep the old mark.
    hwm, rss = _vm_hwm_mb(), _status_mb("VmRSS:")
    return hwm is None or rss is None or hwm <= rss + 16


def _status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024 / 1e6
    except (OSError, ValueError, IndexError):
        pass
    return None


def _vm_hwm_mb() -> float | None:
    return _status_mb("VmHWM:")  # kB (KiB) in /proc


def peak_rss_mb() -> float:
    """Peak resident memory of this process, in MB: ``VmHWM`` on Linux/Android (honours
    :func:`reset_peak_rss`), else ``ru_maxrss`` (KiB on Linux, bytes on macOS)."""
    hwm = _vm_hwm_mb()
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024
    return peak * scale / 1e6


# -- statistics ----------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(np.asarray(values), q)), 4) if values else None


def summarize(values: list[float]) -> dict | None:
    """min / median / max / mean and the relative spread ``(max - min) / median``."""
    if not values:
        return None
    med = statistics.median(values)
    spread = (max(values) - min(values)) / med if med > 0 and len(values) > 1 else 0.0
    return {
        "n": len(values),
        "min": round(min(values), 4),
        "median": round(med, 4),
        "max": round(max(values), 4),
        "mean": round(statistics.fmean(values), 4),
        "spread": round(spread, 4),
        "values": [round(v, 4) for v in values],
    }


def environment(threads: int | None, providers: list[str]) -> dict:
    """Where the numbers were taken (kept for callers of the first runner)."""
    from .sysinfo import environment as env

    return env(threads, providers)


def max_context(root: Path) -> int | None:
    """The model's maximum sequence length from the artifact's ``config.json``, if stated."""
    try:
        cfg = json.loads((root / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    return None


# -- the run -------------------------------------------------------------------------------


@dataclass
class _Measurements:
    """Raw figures collected so far (measured rounds only)."""

    ttft_ms: dict[int, list[float]] = field(default_factory=dict)
    decode_tps: dict[int, list[float]] = field(default_factory=dict)
    step_ms: dict[int, list[float]] = field(default_factory=dict)
    rounds_done: int = 0
    warmups_done: int = 0


class _Run:
    """Collects one benchmark and renders it as the versioned JSON document."""

    def __init__(self, path, config: BenchConfig):
        self.path = Path(path)
        self.config = config
        self.artifact = open_artifact(path)
        self.t_start = time.perf_counter()
        self.started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.peak_reset = reset_peak_rss()
        self.m = _Measurements()
        self.load: dict = {}
        self.warnings: list[str] = []
        self.env: dict | None = None
        self.buckets: list[int] = []
        self.depths: list[int] = []
        self.phase = "load"
        self.energy: dict | None = None  # runtimes/bench/energy.py: the energy block, at the end

    def plan(self, limit: int | None) -> None:
        cfg = self.config
        if limit is not None and cfg.prompt_tokens + cfg.new_tokens > limit:
            raise UsageError(
                f"--prompt-tokens {cfg.prompt_tokens} + --new-tokens {cfg.new_tokens} exceeds the "
                f"model's context of {limit} tokens; ask for fewer tokens"
            )
        for b in cfg.prompt_buckets:
            if limit is None or b + 1 <= limit:
                self.buckets.append(b)
            else:
                self.warnings.append(f"TTFT bucket {b} skipped: over the model's context {limit}")
        for d in cfg.decode_depths:
            if limit is None or d + cfg.depth_tokens + 1 <= limit:
                self.depths.append(d)
            else:
                self.warnings.append(f"decode depth {d} skipped: {d} + {cfg.depth_tokens} "
                                     f"tokens is over the model's context {limit}")
        self.buckets = sorted({*self.buckets, cfg.prompt_tokens})
        self.depths = sorted({*self.depths, cfg.prompt_tokens})

    def new_tokens_at(self, length: int) -> int:
        if length == self.config.prompt_tokens:
            return self.config.new_tokens
        return self.config.depth_tokens + 1 if length in self.depths else 1

    def record(self, length: int, result) -> None:
        m = self.m
        if length in self.buckets:
            m.ttft_ms.setdefault(length, []).append(result.ttft_s * 1000)
        if length in self.depths and result.step_s:
            m.decode_tps.setdefault(length, []).append(result.decode_tokens_per_s)
            m.step_ms.setdefault(length, []).extend(s * 1000 for s in result.step_s)

    def stability(self) -> dict:
        cfg, unstable = self.config, []
        for length, vals in self.m.ttft_ms.items():
            if (s := summarize(vals)) and s["spread"] > cfg.max_spread:
                unstable.append(f"ttft_ms@{length}")
        for length, vals in self.m.decode_tps.items():
            if (s := summarize(vals)) and s["spread"] > cfg.max_spread:
                unstable.append(f"decode_tokens_per_s@{length}")
        verdict = "unstable" if unstable else "ok"
        if self.m.rounds_done < 2:
            verdict = "unknown"
        return {"max_spread": cfg.max_spread, "unstable": unstable, "verdict": verdict}

    def document(self, status: str, error: str | None = None) -> dict:
        cfg, m = self.config, self.m
        ttft = [
            {"prompt_tokens": b, "ttft_ms": summarize(v),
             "prefill_tokens_per_s": summarize([b / (t / 1000) for t in v if t > 0])}
            for b in self.buckets if (v := m.ttft_ms.get(b))
        ]
        decode = [
            {"depth": d, "tokens": self.new_tokens_at(d) - 1,
             "tokens_per_s": summarize(m.decode_tps[d]),
             "ms_p50": percentile(m.step_ms[d], 50), "ms_p90": percentile(m.step_ms[d], 90),
             "ms_p99": percentile(m.step_ms[d], 99)}
            for d in self.depths if m.decode_tps.get(d)
        ]
        main_ttft = summarize(m.ttft_ms.get(cfg.prompt_tokens, []))
        main_tps = summarize(m.decode_tps.get(cfg.prompt_tokens, []))
        main_steps = m.step_ms.get(cfg.prompt_tokens, [])
        stab = self.stability()
        warnings = list(self.warnings)
        if stab["verdict"] == "unstable":
            warnings.append(
                f"run-to-run spread above {cfg.max_spread:.0%} for {', '.join(stab['unstable'])}: "
                "do not trust small differences; close other programs, add --repeats, check "
                "the governor and temperature"
            )
        elif stab["verdict"] == "unknown" and status == "complete":
            warnings.append("fewer than 2 measured rounds: the spread is unknown")
        manifest = self.artifact.manifest
        arch = manifest.get("architecture", {})

        def r(x, nd=3):
            return None if x is None else round(x, nd)

        # VmHWM misses a peak that was returned with madvise (glibc's malloc_trim after the
        # session build: runtimes.sessions.onnx_decoder.release_free_heap) before the kernel updated the
        # mark; the RSS samples taken here are peaks too.
        peak = round(max(peak_rss_mb(), self.load.get("rss_before_mb") or 0.0,
                         self.load.get("rss_after_mb") or 0.0), 1)
        return {
            "schema_version": BENCH_SCHEMA_VERSION,
            "kind": "slmedge.bench",
            "status": status,
            "phase": self.phase,
            "error": error,
            "label": cfg.label or (self.path.name if self.path.is_dir() else self.path.stem),
            "artifact": str(self.path),
            "target": "local",
            "started_at": self.started_at,
            "config": cfg.to_dict(),
            "model": {
                "format": self.artifact.format,
                "model_file": self.artifact.model_path.name,
                "family": arch.get("family"),
                "parameters": arch.get("parameters"),
                "recipe": manifest.get("recipe"),
                "profile": manifest.get("profile") if isinstance(manifest.get("profile"), str)
                else None,
            },
            "quality": manifest.get("quality") if isinstance(manifest.get("quality"), dict)
            else None,
            # Top-level figures read by scripts since schema 1: the main prompt length.
            "model_size_mb": round(self.artifact.file_size_mb(), 2),
            "load_s": self.load.get("load_s"),
            "prompt_tokens": cfg.prompt_tokens,
            "new_tokens": cfg.new_tokens,
            "repeats": cfg.repeats,
            "warmup": cfg.warmup,
            "rounds_done": m.rounds_done,
            "ttft_ms": main_ttft and main_ttft["median"],
            "ttft_ms_min": main_ttft and main_ttft["min"],
            "ttft_ms_max": main_ttft and main_ttft["max"],
            "prefill_tokens_per_s": r(cfg.prompt_tokens / (main_ttft["median"] / 1000), 2)
            if main_ttft and main_ttft["median"] > 0 else None,
            "decode_tokens_per_s": main_tps and main_tps["median"],
            "decode_tokens_per_s_min": main_tps and main_tps["min"],
            "decode_tokens_per_s_max": main_tps and main_tps["max"],
            "decode_ms_p50": percentile(main_steps, 50),
            "decode_ms_p90": percentile(main_steps, 90),
            "decode_ms_p99": percentile(main_steps, 99),
            "rss_before_load_mb": self.load.get("rss_before_mb"),
            "rss_after_load_mb": self.load.get("rss_after_mb"),
            "peak_rss_mb": peak,
            "memory": {
                "rss_before_load_mb": self.load.get("rss_before_mb"),
                "rss_after_load_mb": self.load.get("rss_after_mb"),
                "load_delta_mb": r(self.load.get("rss_after_mb", 0) - self.load["rss_before_mb"], 1)
                if "rss_after_mb" in self.load else None,
                "peak_rss_mb": peak,
                "peak_rss_method": ("VmHWM since bench start" if self.peak_reset
                                    else "process lifetime peak"),
            },
            "ttft": ttft,
            "decode": decode,
            "stability": stab,
            "warnings": warnings,
            "wall_s": r(time.perf_counter() - self.t_start),
            "environment": self.env,
            **({"energy": self.energy} if self.energy is not None else {}),
        }


def run_bench(
    path: str | Path,
    config: BenchConfig = BenchConfig(),
    *,
    providers=None,
    strict: bool = False,
    allow_cpu_fallback: bool = True,
    progress: Callable[[str], None] | None = None,
    on_partial: Callable[[dict], None] | None = None,
) -> dict:
    """Measure an artifact; returns a JSON-ready dict (see ``bench_schema.BenchResult``).

    ``providers`` / ``strict`` / ``allow_cpu_fallback`` go to the ONNX Runtime session
    (``runtimes.sessions.providers``). ``on_partial`` receives the document as it stands after load
    and after every round (``status == "partial"``), so a caller that loses the process
    keeps what was measured.
    """
    from slmedge.runtimes.sessions.providers import decoder_report
    from slmedge.runtimes.sessions.static_decoder import open_decoder
    from .sysinfo import environment as collect_environment
    from .sysinfo import thermal_snapshot

    run = _Run(path, config)
    # a static artifact's window is fixed (ONNX static shapes, or a TFLite KV cache)
    static = run.artifact.manifest.get("static") or run.artifact.manifest.get("tflite") or {}
    # a fused graph's cap (export --max-context; fusion.max_sequence_length) is its maximum
    fused = (run.artifact.manifest.get("fusion") or {}).get("max_sequence_length")
    run.plan(static.get("context_length") or fused or max_context(run.artifact.root))
    say = progress or (lambda _msg: None)
    rss_before = rss_mb()
    say(f"loading {run.artifact.model_path.name}")
    t0 = time.perf_counter()
    session_flags = {}  # only the non-defaults, so older OnnxDecoder signatures still work
    if strict:
        session_flags["strict"] = True
    if not allow_cpu_fallback:
        session_flags["allow_cpu_fallback"] = False
    # LiteRT for a TFLite artifact (no providers to pick), else ONNX Runtime: the dynamic
    # KV-cache graph, or the prefill + decode graphs of a static one
    decoder = open_decoder(run.artifact, threads=config.threads, providers=providers,
                           **session_flags)
    load_s = time.perf_counter() - t0
    run.load = {"load_s": round(load_s, 4), "rss_before_mb": round(rss_before, 1),
                "rss_after_mb": round(rss_mb(), 1)}
    run.env = collect_environment(config.threads, decoder.providers())
    # per session: providers asked/used/skipped, nodes per provider, ops left on CPU
    run.env["node_placement"] = decoder_report(decoder)
    vocab = decoder.vocab_size or int(decoder.step([0]).shape[-1])
    prompt = bench_prompt_ids(vocab, max(run.config.lengths()), config.seed)
    lengths = sorted({*run.buckets, *run.depths})
    if on_partial:
        on_partial(run.document("partial"))
    from .energy import EnergyProbe

    energy = EnergyProbe.open()  # a no-op with its reason where there is no meter
    energy.idle_baseline()
    energy.start()  # samples in a thread; generations below record their intervals
    for i in range(config.warmup + config.repeats):
        warm = i < config.warmup
        run.phase = "warm-up" if warm else f"round {i - config.warmup + 1}/{config.repeats}"
        say(f"bench {run.phase}: context lengths {', '.join(map(str, lengths))}")
        for length in lengths:
            t_gen = time.perf_counter()
            result = generate(decoder, prompt[:length], run.new_tokens_at(length))
            if not warm:
                run.record(length, result)
                energy.record(i - config.warmup, length, t_gen, result)
        if warm:
            run.m.warmups_done += 1
        else:
            run.m.rounds_done += 1
            if on_partial and run.m.rounds_done < config.repeats:
                on_partial(run.document("partial"))
    run.phase = "done"
    run.energy = energy.finish()
    run.env["at_end"] = thermal_snapshot()
    return run.document("complete")


# -- the last result, kept beside the artifact -----------------------------------------------

#: The latest complete ``slmedge bench DIR`` result, written into DIR. It is not in the
#: artifact's file table (a bench does not change the artifact; re-exporting replaces the
#: directory and so drops it); ``slmedge bundle`` carries it as the manifest's ``last_bench``.
LAST_BENCH_NAME = "bench.json"


def record_last_bench(artifact: str | Path, result: dict) -> Path | None:
    """Write ``result`` to ``artifact/bench.json`` (atomically) when ``artifact`` is an
    artifact directory and the run completed; returns the path, or None when nothing was
    written. An OSError (read-only directory) is the caller's to report."""
    root = Path(artifact)
    if result.get("status") != "complete" or not (root / MANIFEST_NAME).is_file():
        return None
    target = root / LAST_BENCH_NAME
    partial = root / f".{LAST_BENCH_NAME}.partial-{os.getpid()}"
    try:
        partial.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


# -- the program run on targets --------------------------------------------------------------


class _Events:
    """Writes progress / partial / result events as prefixed JSON lines on stdout."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.lock = threading.Lock()

    def emit(self, kind: str, **payload) -> None:
        if not self.enabled:
            return
        line = EVENT_PREFIX + json.dumps({"event": kind, **payload}, default=str) + "\n"
        try:
            with self.lock:
                sys.stdout.write(line)
                sys.stdout.flush()
        except (BrokenPipeError, OSError):
            _hang_up("stdout closed")


def _hang_up(why: str) -> None:
    """The controlling connection is gone: stop now, ONNX Runtime threads included."""
    try:
        sys.stderr.write(f"slmedge bench runner: {why}; stopping\n")
        sys.stderr.flush()
    except OSError:
        pass
    os._exit(EXIT_HANGUP)


def _watch_stdin() -> None:
    """Exit when stdin reaches EOF: over SSH/ADB that is the connection closing, and it is
    what stops the runner on the target when the link is lost (no pty, so no SIGHUP)."""

    def watch():
        try:
            while sys.stdin.buffer.read1(65536):
                pass
        except (OSError, ValueError):
            pass
        _hang_up("connection closed (stdin EOF)")

    threading.Thread(target=watch, name="stdin-watchdog", daemon=True).start()


def _parse_lengths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated token counts, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    """``python -m slmedge.runtimes.bench.runner``: run one benchmark, print or stream the JSON."""
    p = argparse.ArgumentParser(prog="python -m slmedge.runtimes.bench.runner",
                                description="slmedge benchmark runner (torch-free)")
    p.add_argument("artifact")
    p.add_argument("--config-json", help="BenchConfig fields as JSON (flags below override)")
    p.add_argument("--prompt-tokens", type=int)
    p.add_argument("--new-tokens", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--repeats", type=int)
    p.add_argument("--prompt-buckets", type=_parse_lengths)
    p.add_argument("--decode-depths", type=_parse_lengths)
    p.add_argument("--providers-json", help='e.g. [["CPUExecutionProvider", {}]]')
    p.add_argument("--strict", action="store_true", help="any provider fallback is an error")
    p.add_argument("--no-cpu-fallback", action="store_true",
                   help="nodes the accelerator cannot take fail the session")
    p.add_argument("--output", help="write the JSON result here too")
    p.add_argument("--events", action="store_true",
                   help=f"stream progress/partial/result as '{EVENT_PREFIX.strip()} {{json}}' lines")
    p.add_argument("--exit-on-stdin-eof", action="store_true",
                   help="stop when stdin closes (the driver's connection went away)")
    p.add_argument("--max-seconds", type=float, help="hard time limit for the whole run")
    args = p.parse_args(argv)
    events = _Events(args.events)
    if args.exit_on_stdin_eof:
        _watch_stdin()
    if args.max_seconds:
        timer = threading.Timer(args.max_seconds, _hang_up, [f"time limit {args.max_seconds} s"])
        timer.daemon = True
        timer.start()
    try:
        fields = json.loads(args.config_json) if args.config_json else {}
        for name in ("prompt_tokens", "new_tokens", "threads", "warmup", "repeats",
                     "prompt_buckets", "decode_depths"):
            if getattr(args, name) is not None:
                fields[name] = getattr(args, name)
        try:
            config = BenchConfig.from_dict(fields)
        except ValueError as e:
            raise UsageError(str(e)) from None
        providers = json.loads(args.providers_json) if args.providers_json else None
        result = run_bench(
            args.artifact, config, providers=providers, strict=args.strict,
            allow_cpu_fallback=not args.no_cpu_fallback,
            progress=lambda msg: (events.emit("progress", message=msg) if args.events
                                  else print(msg, file=sys.stderr, flush=True)),
            on_partial=lambda doc: events.emit("partial", result=doc),
        )
    except SlmEdgeError as e:
        events.emit("error", message=str(e), exit_code=e.exit_code)
        print(f"slmedge bench runner: error: {e}", file=sys.stderr)
        return e.exit_code
    except Exception as e:  # a bug or a runtime failure: the driver gets it as an event too
        traceback.print_exc()
        events.emit("error", message=f"{type(e).__name__}: {e}", exit_code=EXIT_ERROR)
        return EXIT_ERROR
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    if args.events:
        events.emit("result", result=result)
    else:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
