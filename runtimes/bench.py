"""The benchmark runner: load time, TTFT, decode speed and latency, memory, size (no torch).

One process, one artifact. The prompt is a fixed pseudo-random token sequence (same
seed -> same ids), so other tools can be fed the very same prompt; generation never
stops early (stop tokens are ignored) so every run decodes the same number of tokens.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .artifact import open_artifact
from .generation import generate

BENCH_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class BenchConfig:
    """What to measure: prompt length, tokens to generate, threads, warm-up and repeats."""

    prompt_tokens: int = 128
    new_tokens: int = 128
    threads: int = 2
    warmup: int = 1
    repeats: int = 3
    seed: int = 0

    def __post_init__(self):
        for name in ("prompt_tokens", "new_tokens", "threads", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")


def bench_prompt_ids(vocab_size: int, n: int, seed: int = 0) -> list[int]:
    """The benchmark prompt: ``n`` ids drawn uniformly from the vocabulary with ``seed``."""
    return np.random.default_rng(seed).integers(0, vocab_size, size=n).tolist()


def rss_mb() -> float:
    """Current resident memory of this process, in MB (10^6 bytes)."""
    import psutil

    return psutil.Process().memory_info().rss / 1e6


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (``ru_maxrss``; KiB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes
    return peak * scale / 1e6


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def environment(threads: int, providers: list[str]) -> dict:
    """Where the numbers were taken."""
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") or line.startswith("Model"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "os": f"{platform.system()} {platform.release()}",
        "arch": platform.machine(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "providers": providers,
    }


def run_bench(
    path: str | Path,
    config: BenchConfig = BenchConfig(),
    *,
    providers=None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Measure an artifact; returns a JSON-ready dict (see ``BENCH_SCHEMA_VERSION``)."""
    from .onnx_decoder import OnnxDecoder

    artifact = open_artifact(path)
    rss_before = rss_mb()
    t0 = time.perf_counter()
    decoder = OnnxDecoder(artifact.model_path, threads=config.threads, providers=providers)
    load_s = time.perf_counter() - t0
    rss_loaded = rss_mb()
    vocab = decoder.vocab_size or int(decoder.step([0]).shape[-1])
    prompt = bench_prompt_ids(vocab, config.prompt_tokens, config.seed)
    runs = []
    for i in range(config.warmup + config.repeats):
        warm = i < config.warmup
        if progress:
            kind = "warm-up" if warm else f"run {i - config.warmup + 1}/{config.repeats}"
            progress(f"bench {kind}: {config.prompt_tokens} prompt + {config.new_tokens} new tokens")
        result = generate(decoder, prompt, config.new_tokens)
        if not warm:
            runs.append(result)
    ttft = [r.ttft_s * 1000 for r in runs]
    tps = [r.decode_tokens_per_s for r in runs]
    steps_ms = [s * 1000 for r in runs for s in r.step_s]
    return {
        "schema_version": BENCH_SCHEMA_VERSION,
        "artifact": str(Path(path)),
        "model_size_mb": round(artifact.file_size_mb(), 2),
        "load_s": round(load_s, 4),
        "prompt_tokens": config.prompt_tokens,
        "new_tokens": config.new_tokens,
        "repeats": config.repeats,
        "warmup": config.warmup,
        "ttft_ms": round(statistics.median(ttft), 3),
        "ttft_ms_min": round(min(ttft), 3),
        "ttft_ms_max": round(max(ttft), 3),
        "prefill_tokens_per_s": round(config.prompt_tokens / (statistics.median(ttft) / 1000), 2),
        "decode_tokens_per_s": round(statistics.median(tps), 3),
        "decode_tokens_per_s_min": round(min(tps), 3),
        "decode_tokens_per_s_max": round(max(tps), 3),
        "decode_ms_p50": round(percentile(steps_ms, 50), 3),
        "decode_ms_p90": round(percentile(steps_ms, 90), 3),
        "decode_ms_p99": round(percentile(steps_ms, 99), 3),
        "rss_before_load_mb": round(rss_before, 1),
        "rss_after_load_mb": round(rss_loaded, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "environment": environment(config.threads, decoder.providers()),
    }

