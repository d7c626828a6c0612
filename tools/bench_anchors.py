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
  ``slmedge.runtimes.bench.bench_prompt_ids``, exactly ``--new-tokens`` new tokens with
  no early stop; TTFT = call -> first new token, decode = later tokens / their time;
- the greedy tokens of each tool are compared with PyTorch's (identical leading tokens);
  ``slmedge bench`` does not report its tokens, so an untimed ``slmedge_tokens.py`` run
  on the same artifact and prompt provides them (and checks the prompt is the same).

Everything is built on first use and cached under ``--cache-dir``: the GGUF as a plain
HF directory (``tools/anchors/prepare_hf.py``), the slmedge export, the venv for
Optimum (``.venv-optimum``: optimum-onnx 0.1.0 pins transformers<4.58, slmedge uses 5.x)
and Optimum's export. ``--slmedge-artifact DIR`` benchmarks an existing artifact instead
(e.g. one exported with other flags).

    python tools/bench_anchors.py                      # 3 rounds, 128 + 128 tokens, 2 threads
    python tools/bench_anchors.py --repeats 1 --new-tokens 16 --tools slmedge,pytorch --json

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
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ANCHORS = REPO / "tools" / "anchors"
TOOLS = ("slmedge", "pytorch", "optimum")
DEFAULT_MODEL = "embedded:smollm2-135m-instruct"
SCHEMA_VERSION = 1

# The Optimum venv. torch is installed first and on its own, pinned: an unpinned torch
# (optimum depends on "torch>=1.11") resolves to a multi-GB CUDA build; 2.13.0 is a CPU
# build. It stays pinned in the second install so that pip fails rather than replace it.
# The rest are the versions optimum-onnx 0.1.0 resolved to here (it asks optimum~=2.1.0,
# transformers>=4.36,<4.58); onnxruntime is the main venv's, so both ONNX tools run on
# the same ORT and differ only in the graph and the loop around it.
TORCH_PIN = "torch==2.13.0"
OPTIMUM_PINS = ("optimum-onnx==0.1.0", "optimum==2.1.0", "transformers==4.57.6")
VERSION_PACKAGES = (
    "slmedge",
    "torch",
    "transformers",
    "onnxruntime",
    "optimum",
    "optimum-onnx",
    "onnx",
    "numpy",
    "tokenizers",
)

# Children run offline (the hub is not needed: everything is local) with the thread count
# asked for, also for OpenMP/MKL pools the tools do not size themselves.
_CHILD_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
}


class StepFailed(Exception):
    """A named step of the benchmark failed; ``str()`` is the one-line reason."""

    def __init__(self, step: str, reason: str):
        super().__init__(f"step '{step}' failed: {reason}")
        self.step = step


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


def exporter_source_key(package_dir: Path, versions: dict[str, str]) -> str:
    """A fingerprint of the exporter's code and stack: a changed exporter means re-export."""
    h = hashlib.sha256(json.dumps(versions, sort_keys=True).encode())
    for path in sorted(package_dir.rglob("*.py")):
        h.update(str(path.relative_to(package_dir)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


# -- running steps -------------------------------------------------------------------------


@dataclass
class Runner:
    """Runs child processes, logs their output to ``log_dir``, turns failures into StepFailed."""

    log_dir: Path
    threads: int
    say: Callable[[str], None]

    def env(self) -> dict[str, str]:
        n = str(self.threads)
        return {**os.environ, **_CHILD_ENV, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}

    def run(self, step: str, cmd: Sequence[str | Path], *, timeout: float = 3600) -> Completed:
        """Run ``cmd`` to the end; its stderr goes to ``<log_dir>/<step>.log``.

        The child's peak RSS is taken from ``wait4``'s resource usage (``ru_maxrss`` of that
        process alone), so every tool's memory is measured the same way, from outside.
        """
        cmd = [str(c) for c in cmd]
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', step)}.log"
        timed_out = threading.Event()
        with open(log, "w") as err, tempfile.TemporaryFile("w+") as out:
            err.write("$ " + " ".join(cmd) + "\n")
            err.flush()
            try:
                proc = subprocess.Popen(
                    cmd, stdout=out, stderr=err, text=True, env=self.env(), cwd=REPO
                )
            except OSError as e:
                raise StepFailed(step, f"cannot run {cmd[0]}: {e.strerror}") from None
            timer = threading.Timer(timeout, lambda: (timed_out.set(), proc.kill()))
            timer.start()
            try:
                peak = _wait(proc)
            finally:
                timer.cancel()
                if proc.returncode is None:  # interrupted: do not leave the child running
                    proc.kill()
                    proc.wait()
            out.seek(0)
            stdout = out.read()
        if timed_out.is_set():
            raise StepFailed(step, f"timed out after {timeout:.0f} s (log: {_rel(log)})")
        if proc.returncode != 0:
            raise StepFailed(
                step,
                f"{Path(cmd[0]).name} exited {proc.returncode}: "
                f"{_last_line(log)} (log: {_rel(log)})",
            )
        return Completed(stdout, peak)

    def run_json(self, step: str, cmd: Sequence[str | Path], **kw) -> dict:
        """Run ``cmd`` and parse its stdout: one JSON document (indented or on one line).

        The child's peak RSS measured from outside is added as ``_peak_rss_mb_wait4``."""
        done = self.run(step, cmd, **kw)
        out = done.stdout
        result = None
        # The whole of stdout, else its last line (should a library have printed first).
        for text in (out, (out.strip().splitlines() or [""])[-1]):
            try:
                result = json.loads(text)
                break
            except json.JSONDecodeError:
                pass
        if not isinstance(result, dict):
            raise StepFailed(step, f"expected one JSON object on stdout, got {out[-200:]!r}")
        result["_peak_rss_mb_wait4"] = done.peak_rss_mb
        return result


@dataclass
class Completed:
    """What a finished child left: its stdout, and its peak RSS in MB (None if unknown)."""

    stdout: str
    peak_rss_mb: float | None


def _wait(proc: subprocess.Popen) -> float | None:
    """Wait for ``proc``; returns its peak RSS in MB (10^6 bytes) from ``wait4``."""
    if not hasattr(os, "wait4"):
        proc.wait()
        return None
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: KiB on Linux, bytes on macOS
    return usage.ru_maxrss * scale / 1e6


def _last_line(log: Path) -> str:
    lines = [
        ln.strip()
        for ln in log.read_text(errors="replace").replace("\r", "\n").splitlines()
        if ln.strip()
    ]
    return lines[-1][:300] if len(lines) > 1 else "(no output)"


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def slmedge_command() -> Path:
    """The ``slmedge`` console script of this interpreter's environment."""
    beside = Path(sys.executable).parent / "slmedge"
    found = beside if beside.exists() else shutil.which("slmedge")
    if not found:
        raise StepFailed(
            "slmedge",
            f"no 'slmedge' command beside {sys.executable} or on PATH; run tools/setup.sh",
        )
    return Path(found)


def venv_versions(python: Path | str) -> dict[str, str]:
    """Versions of the packages that matter, as installed in the environment of ``python``.

    Run isolated (``-I``): otherwise the current directory is on ``sys.path`` and, in the
    repository, its ``slmedge.egg-info`` would make slmedge look installed everywhere.
    """
    code = (
        "import json, importlib.metadata as m\nout = {}\n"
        f"for n in {list(VERSION_PACKAGES)!r}:\n"
        "    try: out[n] = m.version(n)\n    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))"
    )
    try:
        return json.loads(
            subprocess.run(
                [str(python), "-I", "-c", code],
                capture_output=True,
                text=True,
                check=True,
                timeout=120,
            ).stdout
        )
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError):
        return {}


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


# -- preparation steps ---------------------------------------------------------------------


def model_slug(model: str) -> str:
    name = model.removeprefix("embedded:")
    name = Path(name).stem if name.endswith(".gguf") else Path(name).name or name
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-").lower() or "model"


def prepare_hf_dir(run: Runner, model: str, out: Path) -> dict:
    """The model as a plain fp32 HF directory that transformers 4.57 and 5.x both read."""
    info = run.run_json(
        "hf-weights", [sys.executable, ANCHORS / "prepare_hf.py", "--model", model, "--output", out]
    )
    info.pop("_peak_rss_mb_wait4", None)
    return info


def export_slmedge(run: Runner, model: str, out: Path) -> dict:
    """``slmedge export`` of ``model`` (fp32), redone when the exporter code has changed."""
    from importlib.util import find_spec

    spec = find_spec("slmedge.exporter")
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    stack = {k: v for k, v in venv_versions(sys.executable).items() if k != "optimum"}
    key = exporter_source_key(package_dir, stack)
    key_file = out.parent / f"{out.name}.source-key"
    if (out / "manifest.json").exists() and key_file.exists() and key_file.read_text() == key:
        return {"output": str(out), "cached": True}
    key_file.unlink(missing_ok=True)
    run.say(f"exporting {model} with slmedge (fp32) -> {_rel(out)}")
    run.run(
        "slmedge-export",
        [slmedge_command(), "export", "--model", model, "--output", out, "--overwrite", "--json"],
    )
    key_file.write_text(key)
    return {"output": str(out), "cached": False}


def ensure_optimum_venv(run: Runner, venv: Path) -> Path:
    """Create (or complete) the Optimum venv; returns its python. Idempotent."""
    python = venv / "bin" / "python"
    ort_version = metadata.version("onnxruntime")
    requirements = [TORCH_PIN, *OPTIMUM_PINS, f"onnxruntime=={ort_version}"]
    marker = venv / "slmedge-anchors-venv.json"
    if python.exists() and marker.exists():
        try:
            if json.loads(marker.read_text()).get("requirements") == requirements:
                return python
        except json.JSONDecodeError:
            pass
    run.say(f"building {_rel(venv)} ({', '.join(requirements)}); this takes minutes")
    if not python.exists():
        run.run("optimum-venv", [sys.executable, "-m", "venv", venv], timeout=600)
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check", "--quiet"]
    run.run("optimum-venv", [*pip, TORCH_PIN])
    run.run("optimum-venv", [*pip, *requirements])
    marker.write_text(json.dumps({"requirements": requirements}, indent=2) + "\n")
    return python


def export_optimum(run: Runner, python: Path, hf_dir: Path, out: Path) -> dict:
    """``optimum-cli export onnx --task text-generation-with-past`` of the HF directory."""
    marker = out / "slmedge-anchors-export.json"
    source = json.loads((hf_dir / "slmedge-anchors-source.json").read_text())
    if marker.exists() and json.loads(marker.read_text()).get("source") == source:
        return {"output": str(out), "cached": True}
    run.say(f"exporting with optimum-cli -> {_rel(out)}")
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    cli = python.parent / "optimum-cli"
    try:
        run.run(
            "optimum-export",
            [cli, "export", "onnx", "--model", hf_dir, "--task", "text-generation-with-past", tmp],
        )
        if not (tmp / "model.onnx").exists():
            raise StepFailed("optimum-export", f"optimum-cli wrote no model.onnx in {tmp}")
        (tmp / marker.name).write_text(json.dumps({"source": source}, indent=2) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"output": str(out), "cached": False}


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


def _manifest_summary(artifact: Path) -> dict:
    """What the slmedge artifact is: how it was made, its recipe and graph size."""
    try:
        m = json.loads((artifact / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    onnx = m.get("onnx") or {}
    return {
        "command": m.get("command"),
        "created_at": m.get("created_at"),
        "recipe": m.get("recipe"),
        "nodes": onnx.get("nodes"),
        "ops": onnx.get("ops"),
    }


def measure(run: Runner, tool: str, setup: Setup, label: str) -> dict:
    """One process: load, warm up, one timed generation. Returns the common fields."""
    a = setup.args
    common = ["--new-tokens", a.new_tokens, "--threads", a.threads, "--warmup", a.warmup]
    if tool == "slmedge":
        r = run.run_json(
            f"{label}-slmedge",
            [
                slmedge_command(),
                "bench",
                setup.slmedge_dir,
                "--json",
                "--prompt-tokens",
                a.prompt_tokens,
                "--repeats",
                1,
                # Only the one prompt length the other tools run: by default slmedge bench
                # also visits 32/512-token buckets and depths (longer, and a larger peak RSS).
                "--prompt-buckets",
                a.prompt_tokens,
                "--depths",
                a.prompt_tokens,
                *common,
            ],
        )
        keep = (
            "load_s",
            "ttft_ms",
            "decode_tokens_per_s",
            "peak_rss_mb",
            "model_size_mb",
            "decode_ms_p50",
        )
        out = {k: r[k] for k in keep if k in r}
        if "tokens" in r:  # should slmedge bench ever report them
            out["tokens"] = r["tokens"]
        return _with_outside_rss(out, r)
    python, model_dir = (
        (sys.executable, setup.hf_dir)
        if tool == "pytorch"
        else (setup.optimum_python, setup.optimum_dir)
    )
    r = run.run_json(
        f"{label}-{tool}",
        [
            python,
            ANCHORS / "run_hf.py",
            "--backend",
            tool,
            "--model-dir",
            model_dir,
            "--prompt-file",
            setup.prompt_file,
            *common,
        ],
    )
    keep = (
        "load_s",
        "ttft_ms",
        "decode_tokens_per_s",
        "peak_rss_mb",
        "model_size_mb",
        "decode_ms_p50",
        "tokens",
        "use_io_binding",
    )
    return _with_outside_rss({k: r[k] for k in keep if k in r}, r)


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
    say(f"wrote {_rel(output)}")
    print(result["table"], file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


def bench(args, tools: list[str], cache: Path, run: Runner, say) -> dict:
    """Prepare what the tools need, run the rounds, and assemble the JSON result."""
    from slmedge.runtimes.bench import bench_prompt_ids

    t_start = time.perf_counter()
    env = environment()
    env["venvs"] = {"main": {"python": sys.executable, "versions": venv_versions(sys.executable)}}
    artifacts: dict[str, dict] = {}
    setup = Setup(args=args, prompt_file=run.log_dir / "prompt.json")

    if "pytorch" in tools or "optimum" in tools:
        setup.hf_dir = cache / "hf"
        if not (setup.hf_dir / "slmedge-anchors-source.json").exists():
            say(f"writing the weights as a plain HF directory (once) -> {_rel(setup.hf_dir)}")
        artifacts["hf"] = prepare_hf_dir(run, args.model, setup.hf_dir)
    if "slmedge" in tools:
        if args.slmedge_artifact:
            setup.slmedge_dir = args.slmedge_artifact
            artifacts["slmedge"] = {"output": str(args.slmedge_artifact), "given": True}
        else:
            setup.slmedge_dir = cache / "slmedge-fp32"
            artifacts["slmedge"] = export_slmedge(run, args.model, setup.slmedge_dir)
        artifacts["slmedge"]["manifest"] = _manifest_summary(setup.slmedge_dir)
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
