"""The benchmark result schema (version 2), as pydantic models.

``runtimes/bench/runner.py`` writes plain dicts (the runner on a Pi or a phone needs no
pydantic); this module is what readers validate them against: ``slmedge compare``,
``slmedge report`` and the tests. ``python -m slmedge.runtimes.bench.schema`` prints
the JSON Schema.

Units: milliseconds (``_ms``), seconds (``_s``), megabytes of 10^6 bytes (``_mb``),
tokens per second (``tokens_per_s``).

Version history:
  1  flat: ttft_ms, decode_tokens_per_s, decode_ms_p50/p90/p99, peak_rss_mb, load_s, ...
  2  adds TTFT per prompt-length bucket, decode per context depth, min/median/max and
     spread of every repeated figure, a stability verdict, memory after load, the full
     environment (cores, governor, temperature at start and end), status for partial
     results from a lost connection. The flat keys of version 1 stay (main prompt length).
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from slmedge.runtimes.bench.runner import BENCH_SCHEMA_VERSION
from slmedge.runtimes.errors import UsageError, validation_problems

_STRICT = ConfigDict(extra="forbid")


class Stats(BaseModel):
    """A figure measured once per round: its distribution over the measured rounds."""

    model_config = _STRICT
    n: int = Field(ge=1, description="measured rounds")
    min: float = Field(description="smallest value")
    median: float = Field(description="median value (the headline figure)")
    max: float = Field(description="largest value")
    mean: float = Field(description="arithmetic mean")
    spread: float = Field(ge=0, description="(max - min) / median; 0 with one round")
    values: list[float] = Field(description="every measured round's value, in order")


class TtftBucket(BaseModel):
    """Time to first token for one prompt length."""

    model_config = _STRICT
    prompt_tokens: int = Field(ge=1, description="prompt length of this bucket")
    ttft_ms: Stats = Field(description="prefill + first sampled token, ms")
    prefill_tokens_per_s: Stats | None = Field(description="prompt_tokens / TTFT")


class DecodeDepth(BaseModel):
    """Decode speed and per-token latency after a context of ``depth`` tokens."""

    model_config = _STRICT
    depth: int = Field(ge=1, description="tokens in the KV cache before the timed steps")
    tokens: int = Field(ge=1, description="timed decode steps per round")
    tokens_per_s: Stats = Field(description="decode steps / their total time, per round")
    ms_p50: float = Field(description="median per-token latency over all rounds' steps, ms")
    ms_p90: float = Field(description="90th percentile per-token latency, ms")
    ms_p99: float = Field(description="99th percentile per-token latency, ms")


class Stability(BaseModel):
    """Whether the repeats agree well enough to trust the medians."""

    model_config = _STRICT
    max_spread: float = Field(gt=0, description="largest spread accepted as stable")
    unstable: list[str] = Field(description="figures whose spread exceeds max_spread")
    verdict: Literal["ok", "unstable", "unknown"] = Field(
        description="unknown: fewer than 2 measured rounds")


class Memory(BaseModel):
    """Resident memory of the benchmark process (never system-wide)."""

    model_config = _STRICT
    rss_before_load_mb: float | None = Field(description="RSS before the session was created")
    rss_after_load_mb: float | None = Field(description="RSS right after the session was created")
    load_delta_mb: float | None = Field(description="after - before load")
    peak_rss_mb: float = Field(description="peak RSS of the process during the benchmark")
    peak_rss_method: str = Field(description="how the peak was read (VmHWM reset or lifetime)")


class ThermalSnapshot(BaseModel):
    """Facts that drift during a run, taken at its start and end."""

    model_config = _STRICT
    temperature_c: dict[str, float] = Field(description="thermal zone type -> degrees C (sysfs)")
    cpu_freq_mhz: dict[str, float] = Field(description="cpuN -> current frequency, MHz")
    load_average: list[float] | None = Field(description="1/5/15-minute load average")


class Cores(BaseModel):
    model_config = _STRICT
    logical: int | None = Field(description="logical CPUs (os.cpu_count)")
    physical: int | None = Field(description="physical cores (psutil)")
    usable: int | None = Field(description="CPUs this process may run on (affinity)")


class Environment(BaseModel):
    """Where the numbers were taken."""

    model_config = _STRICT
    hostname: str = Field(description="host name of the machine that ran the benchmark")
    cpu: str = Field(description="CPU model (or board) name from /proc/cpuinfo")
    cpu_count: int | None = Field(description="logical CPUs")
    cores: Cores = Field(description="logical / physical / usable cores")
    threads: int | None = Field(description="intra-op threads asked for (None: ORT's choice)")
    os: str = Field(description="OS name and kernel release")
    arch: str = Field(description="machine architecture (x86_64, aarch64, ...)")
    python: str = Field(description="Python version")
    python_implementation: str = Field(description="CPython, PyPy, ...")
    executable: str = Field(description="the Python interpreter that ran the runner")
    onnxruntime: str = Field(description="onnxruntime version")
    litert: str | None = Field(description="ai-edge-litert / tflite-runtime version, if installed")
    numpy: str | None = Field(description="numpy version")
    providers: list[str] = Field(description="execution providers of the session, in order")
    available_providers: list[str] = Field(description="providers this onnxruntime offers")
    node_placement: dict | None = Field(
        description="nodes per execution provider (device-profile runs); None = not measured")
    governor: dict[str, list[int]] = Field(description="cpufreq governor -> CPUs using it")
    memory_total_mb: float | None = Field(description="physical memory of the machine")
    android: dict[str, str] = Field(description="getprop facts on Android, else empty")
    at_start: ThermalSnapshot = Field(description="temperature / frequency / load at start")
    at_end: ThermalSnapshot | None = Field(description="the same at the end (None if partial)")


class ModelInfo(BaseModel):
    model_config = _STRICT
    format: str = Field(description="artifact format (onnx, tflite)")
    model_file: str = Field(description="model file name inside the artifact")
    family: str | None = Field(description="architecture family from the manifest")
    parameters: int | None = Field(description="parameter count from the manifest")
    recipe: dict | None = Field(description="export recipe from the manifest (dtype, quantization)")
    profile: str | None = Field(description="device profile the artifact was built for")


class BenchConfigModel(BaseModel):
    model_config = _STRICT
    prompt_tokens: int = Field(ge=1, description="main prompt length")
    new_tokens: int = Field(ge=1, description="tokens generated after the main prompt")
    threads: int | None = Field(description="intra-op threads")
    warmup: int = Field(ge=0, description="unmeasured rounds first")
    repeats: int = Field(ge=1, description="measured rounds")
    seed: int = Field(description="seed of the pseudo-random prompt")
    prompt_buckets: list[int] = Field(description="prompt lengths for TTFT")
    decode_depths: list[int] = Field(description="context depths for decode latency")
    depth_tokens: int = Field(ge=1, description="timed decode steps at each extra depth")
    max_spread: float = Field(gt=0, description="spread above which a figure is unstable")
    label: str | None = Field(description="name of this variant in tables and plots")


class EnergyReport(BaseModel):
    """Energy per token (``runtimes/bench/energy.py``): measured, or absent with the reason."""

    model_config = _STRICT
    available: bool = Field(description="False: no meter here, or it was refused (see reason)")
    reason: str | None = Field(default=None, description="why there is no figure")
    method: str | None = Field(default=None, description="meter: rapl, rpi5-pmic, "
                               "android-battery")
    source: str | None = Field(default=None, description="what was read (sysfs path, command)")
    sample_hz: float | None = Field(default=None, description="meter samples per second")
    samples: int | None = Field(default=None, description="samples taken during the rounds")
    idle_w: float | None = Field(default=None, description="idle baseline power subtracted, W "
                                 "(None: not subtracted)")
    decode_mj_per_token: float | None = Field(default=None, description="mJ per decoded token "
                                              "(median over rounds)")
    prefill_mj_per_token: float | None = Field(default=None, description="mJ per prompt token "
                                               "in prefill (median over rounds)")
    decode_uncertainty_mj: float | None = Field(default=None, description="+- on the decode "
                                                "figure (round spread and sampling)")
    prefill_uncertainty_mj: float | None = Field(default=None, description="+- on the prefill "
                                                 "figure")
    decode_w: float | None = Field(default=None, description="mean power during decode, W")
    notes: list[str] = Field(default_factory=list, description="caveats of the method")


class BenchResult(BaseModel):
    """One ``slmedge bench`` result (schema version 2)."""

    model_config = _STRICT
    schema_version: Literal[2] = Field(description="version of this schema")
    kind: Literal["slmedge.bench"] = Field(description="document type")
    status: Literal["complete", "partial"] = Field(
        description="partial: the run stopped early (e.g. lost connection); figures so far")
    phase: str = Field(description="last phase reached: load, warm-up, round i/n, done")
    error: str | None = Field(description="why a partial result stopped")
    label: str = Field(description="variant name (artifact directory name unless --label)")
    artifact: str = Field(description="artifact path as given (on the target for remote runs)")
    target: str = Field(description="local, ssh://user@host:port or adb://SERIAL")
    started_at: str = Field(description="UTC start time, ISO 8601")
    config: BenchConfigModel = Field(description="what was asked")
    model: ModelInfo = Field(description="facts from the artifact manifest")
    quality: dict | None = Field(description="quality card from the manifest (perplexity, ...)")
    model_size_mb: float = Field(ge=0, description="model files on disk (graph + weights)")
    load_s: float | None = Field(description="session creation time (first load, this process)")
    prompt_tokens: int = Field(description="= config.prompt_tokens")
    new_tokens: int = Field(description="= config.new_tokens")
    repeats: int = Field(description="= config.repeats")
    warmup: int = Field(description="= config.warmup")
    rounds_done: int = Field(ge=0, description="measured rounds completed")
    ttft_ms: float | None = Field(description="median TTFT at prompt_tokens")
    ttft_ms_min: float | None = Field(description="min TTFT at prompt_tokens")
    ttft_ms_max: float | None = Field(description="max TTFT at prompt_tokens")
    prefill_tokens_per_s: float | None = Field(description="prompt_tokens / median TTFT")
    decode_tokens_per_s: float | None = Field(description="median decode tok/s after the prompt")
    decode_tokens_per_s_min: float | None = Field(description="min over rounds")
    decode_tokens_per_s_max: float | None = Field(description="max over rounds")
    decode_ms_p50: float | None = Field(description="per-token latency p50 after the prompt")
    decode_ms_p90: float | None = Field(description="p90")
    decode_ms_p99: float | None = Field(description="p99")
    rss_before_load_mb: float | None = Field(description="= memory.rss_before_load_mb")
    rss_after_load_mb: float | None = Field(description="= memory.rss_after_load_mb")
    peak_rss_mb: float = Field(description="= memory.peak_rss_mb")
    memory: Memory = Field(description="process memory figures")
    ttft: list[TtftBucket] = Field(description="TTFT per prompt-length bucket")
    decode: list[DecodeDepth] = Field(description="decode speed per context depth")
    stability: Stability = Field(description="run-to-run spread verdict")
    warnings: list[str] = Field(description="skipped buckets, unstable figures, ...")
    wall_s: float = Field(ge=0, description="wall time of the whole benchmark in the runner")
    environment: Environment | None = Field(description="None only before the model loaded")
    # additive, optional (issue 17): absent in results written before them
    device: str | None = Field(default=None, description="fleet device name (slmedge bench "
                               "--fleet); None for a single-target run")
    energy: EnergyReport | None = Field(default=None, description="energy per token where the "
                                        "target has a meter (runtimes/bench/energy.py), or why not")


def validate_result(doc: dict, source: str = "result") -> BenchResult:
    """Validate a result dict; raise :class:`UsageError` naming the first problems."""
    version = doc.get("schema_version") if isinstance(doc, dict) else None
    if version != BENCH_SCHEMA_VERSION:
        raise UsageError(
            f"{source}: bench schema version {version!r}, this slmedge reads version "
            f"{BENCH_SCHEMA_VERSION}; run slmedge bench again with this version"
        )
    try:
        return BenchResult.model_validate(doc)
    except ValidationError as e:
        raise UsageError(f"{source} is not a valid bench result: "
                         f"{validation_problems(e, limit=5)}") from None


def load_result(path) -> BenchResult:
    """Read and validate a bench JSON file."""
    from pathlib import Path

    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except OSError as e:
        raise UsageError(f"cannot read {p}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{p} is not JSON ({e})") from None
    return validate_result(doc, str(p))


def json_schema() -> dict:
    return BenchResult.model_json_schema()


if __name__ == "__main__":
    print(json.dumps(json_schema(), indent=2))
