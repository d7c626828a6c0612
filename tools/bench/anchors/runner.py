"""Child processes of ``tools/bench/bench_anchors.py``: run, log, measure peak RSS, fail by name.

Every tool's step (export, venv build, measurement) runs through :class:`Runner`, so each
one's peak RSS is taken the same way, from outside (``wait4``), and a failure is one line
naming the step and its log.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
ANCHORS = REPO / "tools" / "bench" / "anchors"
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
            raise StepFailed(step, f"timed out after {timeout:.0f} s (log: {rel(log)})")
        if proc.returncode != 0:
            raise StepFailed(
                step,
                f"{Path(cmd[0]).name} exited {proc.returncode}: "
                f"{_last_line(log)} (log: {rel(log)})",
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


def rel(path: Path) -> str:
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
