"""Side-by-side benchmark: slmedge fp32 vs PyTorch eager vs Optimum's ONNX export.

Runs, in one session, on the same weights (SmolLM2-135M-Instruct, the embedded default)
and the same prompt token ids: ``slmedge bench`` on a ``slmedge export`` artifact,
transformers ``generate`` in PyTorch eager, and Optimum's ``text-generation-with-past``
ONNX export through ``ORTModelForCausalLM`` -- and prints TTFT, decode tok/s, peak RSS,
size and each one's ratio to slmedge's.

How it measures (DESIGN.md: +-15% noise between passes here, so compare within a run):
- every measurement is a process of its own (load, ``--warmup`` untimed generations, one
  timed generation); its peak RSS is that process's ``ru_maxrss``, read by this script
  from ``wait4`` for every tool alike (each tool's own figure is kept in the JSON too);
- the tools alternate in rounds (A B C, A B C, ...), ``--repeats`` rounds; median and
  min/max over the rounds are reported;
- ``--threads`` intra-op threads everywhere, the prompt ids of
  ``slmedge.runtimes.bench.runner.bench_prompt_ids``, exactly ``--new-tokens`` new tokens with
  no early stop; TTFT = call -> first new token, decode = later tokens / their time;
- the greedy tokens of each tool are compared with PyTorch's (identical leading tokens);
  ``slmedge bench`` does not report its tokens, so an untimed ``slmedge_tokens.py`` run
  on the same artifact and prompt provides them (and checks the prompt is the same).

The steps of each side live in ``tools/bench/anchors/``: ``runner.py`` (child processes, their
logs and peak RSS), ``slmedge_tool.py`` (export, ``slmedge bench``), ``hf_tools.py`` (HF
directory, Optimum venv and export, ``run_hf.py``); this script prepares, alternates the
rounds and reports.

Everything is built on first use and cached under ``--cache-dir``: the GGUF as a plain
HF directory (``tools/bench/anchors/prepare_hf.py``), the slmedge export, the venv for
Optimum (``.venv-optimum``: optimum-onnx 0.1.0 pins transformers<4.58, slmedge uses 5.x)
and Optimum's export. ``--slmedge-artifact DIR`` benchmarks an existing artifact instead
(e.g. one exported with other flags).

    python tools/bench/bench_anchors.py                      # 3 rounds, 128 + 128 tokens, 2 threads
    python tools/bench/bench_anchors.py --repeats 1 --new-tokens 16 --tools slmedge,pytorch --json

Exit codes: 0 ok, 1 a step failed (the message names it), 2 usage.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from anchors.hf_tools import (
    OPTIMUM_PINS,
    TORCH_PIN,
    ensure_optimum_venv,
    export_optimum,
    measure_hf,
    prepare_hf_dir,
)
from anchors.runner import (
    ANCHORS,
    REPO,
    Completed,
    Runner,
    StepFailed,
    rel,
    slmedge_command,
    venv_versions,
)
from anchors.slmedge_tool import (
    export_slmedge,
    exporter_source_key,
    manifest_summary,
    measure_slmedge,
)

#: Re-exported: the runners live in tools/bench/anchors/ (runner.py: child processes; slmedge_tool.py
#: and hf_tools.py: each side's export and measurement).
__all__ = ["OPTIMUM_PINS", "TORCH_PIN", "Completed", "Runner", "StepFailed", "ensure_optimum_venv",
           "export_optimum", "export_slmedge", "exporter_source_key", "main", "prepare_hf_dir",
           "slmedge_command", "venv_versions"]

TOOLS = ("slmedge", "pytorch", "optimum")
DEFAULT_MODEL = "embedded:smollm2-135m-instruct"
SCHEMA_VERSION = 1

# -- pure helpers (unit-tested) ------------------------------------------------------------


def summarize(values: Sequence[float]) -> dict:
    """Median, min and max of one metric over the rounds, plus the values themselves."""
    if not values:
        raise ValueError("no values to summarize")
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": list(values),
    }


def leading_agreement(tokens: Sequence[int], reference: Sequence[int]) -> int:
    """How many leading tokens two greedy generations share."""
    n = 0
    for a, b in zip(tokens, reference, strict=False):
        if a != b:
            break
        n += 1
    return n


def ratio(value: float | None, base: float | None) -> float | None:
    """``value / base``, or None when either is missing or the base is zero."""
    if value is None or not base:
        return None
    return value / base


def parse_tools(text: str) -> list[str]:
    """``"slmedge,pytorch"`` -> ``["slmedge", "pytorch"]``, in the order given."""
    tools = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tools if t not in TOOLS]
    if unknown or not tools:
        raise ValueError(
            f"unknown tool(s) {', '.join(unknown) or '(none given)'}; choose from {','.join(TOOLS)}"
        )
    if len(set(tools)) != len(tools):
        raise ValueError(f"a tool is listed twice in '{text}'")
    return tools


def prompt_digest(ids: Sequence[int]) -> str:
    """A short fingerprint of a prompt, to show that all tools got the same ids."""
    return hashlib.sha256(json.dumps([int(i) for i in ids]).encode()).hexdigest()[:16]


METRICS = ("ttft_ms", "decode_tokens_per_s", "peak_rss_mb", "load_s")


def summarize_tool(runs: list[dict], baseline: dict | None) -> dict:
    """One tool's rounds -> medians/min/max, size, and ratios to the baseline's medians."""
    out = {m: summarize([r[m] for r in runs]) for m in METRICS}
    out["model_size_mb"] = runs[-1]["model_size_mb"]
    if baseline is not None:
        ratios = {m: ratio(out[m]["median"], baseline[m]["median"]) for m in METRICS}
        ratios["model_size_mb"] = ratio(out["model_size_mb"], baseline["model_size_mb"])
        out["ratio_to_slmedge"] = {m: _round(r, 4) for m, r in ratios.items()}
    out["rounds"] = runs
    return out


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _spread(s: dict, digits: int) -> str:
    return f"{_num(s['median'], digits)} ({_num(s['min'], digits)}-{_num(s['max'], digits)})"


def format_table(tools: dict[str, dict], new_tokens: int) -> str:
    """The side-by-side table: medians (min-max over rounds), then ratios to slmedge."""
    header = [
        "tool",
        "TTFT ms",
        "decode tok/s",
        "peak RSS MB",
        "size MB",
        "TTFT x",
        "decode x",
        "RSS x",
        "size x",
        "= PyTorch",
    ]
    rows = [header]
    for name, t in tools.items():
        r = t.get("ratio_to_slmedge", {})
        agree = t.get("agreement_with_pytorch")
        rows.append(
            [
                name,
                _spread(t["ttft_ms"], 1),
                _spread(t["decode_tokens_per_s"], 1),
                _num(t["peak_rss_mb"]["median"], 0),
                _num(t["model_size_mb"], 1),
                _num(r.get("ttft_ms"), 2),
                _num(r.get("decode_tokens_per_s"), 2),
                _num(r.get("peak_rss_mb"), 2),
                _num(r.get("model_size_mb"), 2),
                "ref" if name == "pytorch" else ("-" if agree is None else f"{agree}/{new_tokens}"),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=False))
        ).rstrip()
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines) + (
        "\nmedian (min-max) over rounds; 'x' = tool / slmedge (decode x > 1: faster than "
        "slmedge; TTFT/RSS/size x > 1: more than slmedge); '= PyTorch': identical leading "
        "greedy tokens"
    )


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    env = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "os": f"{platform.system()} {platform.release()}",
        "arch": platform.machine(),
        "python": platform.python_version(),
    }
    if hasattr(os, "sched_getaffinity"):
        env["cpus_usable"] = len(os.sched_getaffinity(0))
    if hasattr(os, "getloadavg"):
        env["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    return env


def model_slug(model: str) -> str:
    name = model.removeprefix("embedded:")
    name = Path(name).stem if name.endswith(".gguf") else Path(name).name or name
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-").lower() or "model"


# -- measurements --------------------------------------------------------------------------


@dataclass
class Setup:
    """Everything a measurement needs, resolved once."""

    args: argparse.Namespace
    prompt_file: Path
    slmedge_dir: Path | None = None
    hf_dir: Path | None = None
    optimum_python: Path | None = None
    optimum_dir: Path | None = None


def measure(run: Runner, tool: str, setup: Setup, label: str) -> dict:
    """One process of ``tool``: load, warm up, one timed generation. Returns the common
    fields, peak RSS measured from outside."""
    a = setup.args
    if tool == "slmedge":
        out, reported = measure_slmedge(run, setup.slmedge_dir, a, label)
    else:
        python, model_dir = (
            (sys.executable, setup.hf_dir)
            if tool == "pytorch"
            else (setup.optimum_python, setup.optimum_dir)
        )
        out, reported = measure_hf(run, tool, python, model_dir, setup.prompt_file, a, label)
    return _with_outside_rss(out, reported)


def _with_outside_rss(out: dict, reported: dict) -> dict:
    """Peak RSS as measured from outside (``wait4``) for every tool alike; the tool's own
    figure is kept as ``peak_rss_mb_self`` (slmedge bench reports VmHWM since its start)."""
    out["peak_rss_mb_self"] = out.pop("peak_rss_mb", None)
    outside = reported.get("_peak_rss_mb_wait4")
    out["peak_rss_mb"] = outside if outside is not None else out["peak_rss_mb_self"]
    return out


def _one_line(m: dict) -> str:
    return (
        f"TTFT {m['ttft_ms']:.1f} ms, decode {m['decode_tokens_per_s']:.1f} tok/s, "
        f"peak RSS {m['peak_rss_mb']:.0f} MB"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench_anchors.py",
        description="slmedge fp32 vs PyTorch eager vs Optimum ONNX, side by side in one session",
        epilog="exit codes: 0 ok, 1 a step failed (named in the message), 2 usage",
    )
    p.add_argument(
        "--tools",
        default=",".join(TOOLS),
        help=f"comma-separated, run in this order each round (default {','.join(TOOLS)})",
    )
    p.add_argument("--repeats", type=int, default=3, help="rounds (default 3)")
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed generations per process before the timed one (default 1)",
    )
    p.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"model source for all tools (default {DEFAULT_MODEL})",
    )
    p.add_argument(
        "--slmedge-artifact",
        type=Path,
        help="benchmark this slmedge artifact instead of exporting --model",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=REPO / "artifacts" / "bench" / "anchors",
        help="where the HF copy, the exports and the logs are kept",
    )
    p.add_argument("--optimum-venv", type=Path, default=REPO / ".venv-optimum")
    p.add_argument(
        "--output", type=Path, help="JSON result (default artifacts/bench/anchors-<timestamp>.json)"
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print the JSON result on stdout (progress and table go to stderr)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        tools = parse_tools(args.tools)
    except ValueError as e:
        parser.error(str(e))
    for name in ("repeats", "threads", "prompt_tokens", "new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.slmedge_artifact and not args.slmedge_artifact.is_dir():
        parser.error(f"--slmedge-artifact {args.slmedge_artifact} is not a directory")

    def say(msg: str) -> None:
        print(f"[bench_anchors] {msg}", file=sys.stderr, flush=True)

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    output = args.output or REPO / "artifacts" / "bench" / f"anchors-{stamp}.json"
    cache = args.cache_dir / model_slug(args.model)
    run = Runner(log_dir=cache / "logs" / stamp, threads=args.threads, say=say)
    try:
        result = bench(args, tools, cache, run, say)
    except StepFailed as e:
        print(f"bench_anchors: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench_anchors: interrupted", file=sys.stderr)
        return 130
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    say(f"wrote {rel(output)}")
    print(result["table"], file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


def bench(args, tools: list[str], cache: Path, run: Runner, say) -> dict:
    """Prepare what the tools need, run the rounds, and assemble the JSON result."""
    from slmedge.runtimes.bench.runner import bench_prompt_ids

    t_start = time.perf_counter()
    env = environment()
    env["venvs"] = {"main": {"python": sys.executable, "versions": venv_versions(sys.executable)}}
    artifacts: dict[str, dict] = {}
    setup = Setup(args=args, prompt_file=run.log_dir / "prompt.json")

    if "pytorch" in tools or "optimum" in tools:
        setup.hf_dir = cache / "hf"
        if not (setup.hf_dir / "slmedge-anchors-source.json").exists():
            say(f"writing the weights as a plain HF directory (once) -> {rel(setup.hf_dir)}")
        artifacts["hf"] = prepare_hf_dir(run, args.model, setup.hf_dir)
    if "slmedge" in tools:
        if args.slmedge_artifact:
            setup.slmedge_dir = args.slmedge_artifact
            artifacts["slmedge"] = {"output": str(args.slmedge_artifact), "given": True}
        else:
            setup.slmedge_dir = cache / "slmedge-fp32"
            artifacts["slmedge"] = export_slmedge(run, args.model, setup.slmedge_dir)
        artifacts["slmedge"]["manifest"] = manifest_summary(setup.slmedge_dir)
    if "optimum" in tools:
        setup.optimum_python = ensure_optimum_venv(run, args.optimum_venv)
        env["venvs"]["optimum"] = {
            "python": str(setup.optimum_python),
            "versions": venv_versions(setup.optimum_python),
        }
        setup.optimum_dir = cache / "optimum-fp32"
        artifacts["optimum"] = export_optimum(
            run, setup.optimum_python, setup.hf_dir, setup.optimum_dir
        )

    # The prompt: slmedge bench builds it from the session's vocabulary; the HF tools get
    # the same ids from a file, built from config.json's vocabulary. The sanity run
    # below shows (and checks) that both are the same list.
    slmedge_check = None
    if "slmedge" in tools:
        say("slmedge greedy tokens for the benchmark prompt (untimed sanity run)")
        slmedge_check = run.run_json(
            "slmedge-tokens",
            [
                sys.executable,
                ANCHORS / "slmedge_tokens.py",
                setup.slmedge_dir,
                "--prompt-tokens",
                args.prompt_tokens,
                "--new-tokens",
                args.new_tokens,
                "--threads",
                args.threads,
            ],
        )
        vocab = slmedge_check["vocab_size"]
    if setup.hf_dir is not None:
        vocab_hf = json.loads((setup.hf_dir / "config.json").read_text())["vocab_size"]
        if slmedge_check and vocab_hf != vocab:
            raise StepFailed(
                "prompt",
                f"slmedge's vocabulary has {vocab} ids, the HF config "
                f"{vocab_hf}: the tools would not get the same prompt",
            )
        vocab = vocab_hf
    prompt = bench_prompt_ids(vocab, args.prompt_tokens, seed=0)
    if slmedge_check and slmedge_check["prompt_ids"] != prompt:
        raise StepFailed(
            "prompt", "slmedge bench's prompt differs from the one given to the other tools"
        )
    setup.prompt_file.parent.mkdir(parents=True, exist_ok=True)
    setup.prompt_file.write_text(json.dumps(prompt))

    rounds: dict[str, list[dict]] = {t: [] for t in tools}
    for i in range(1, args.repeats + 1):
        for tool in tools:
            say(f"round {i}/{args.repeats}: {tool} ...")
            m = measure(run, tool, setup, f"round{i}")
            rounds[tool].append(m)
            say(f"round {i}/{args.repeats}: {tool}: {_one_line(m)}")

    results: dict[str, dict] = {}
    baseline = None
    if "slmedge" in tools:
        baseline = summarize_tool(rounds["slmedge"], None)
    for tool in tools:
        results[tool] = summarize_tool(rounds[tool], baseline)
        tokens = rounds[tool][-1].get("tokens")
        if tool == "slmedge" and tokens is None and slmedge_check:
            tokens = slmedge_check["tokens"]
        results[tool]["tokens"] = tokens
    reference = results.get("pytorch", {}).get("tokens")
    for tool in tools:
        tokens = results[tool]["tokens"]
        results[tool]["agreement_with_pytorch"] = (
            leading_agreement(tokens, reference) if tokens and reference else None
        )
    table = format_table(results, args.new_tokens)
    if hasattr(os, "getloadavg"):
        env["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "slmedge-bench-anchors",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "model": args.model,
        "config": {
            "tools": tools,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "threads": args.threads,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "prompt_seed": 0,
        },
        "prompt": {
            "vocab_size": vocab,
            "sha256_16": prompt_digest(prompt),
            "first_ids": prompt[:8],
        },
        "environment": env,
        "artifacts": artifacts,
        "tools": results,
        "table": table,
        "elapsed_s": round(time.perf_counter() - t_start, 1),
    }


if __name__ == "__main__":
    sys.exit(main())
