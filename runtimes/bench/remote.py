"""Run the benchmark on another machine: a Raspberry Pi over SSH, a phone over ADB (no torch).

The driver copies the artifact and this torch-free ``slmedge.runtimes`` package to the
target, makes (or reuses) a Python environment there, runs ``python -m
slmedge.runtimes.bench.runner --events`` and reads its JSON events as they come::

    local                                   target (ROOT = remote dir)
    open_artifact(DIR)                      ROOT/artifacts/<name>-<manifest hash>/   (cached)
    runtimes/*.py          --copy-->        ROOT/lib/<code hash>/slmedge/runtimes/   (cached)
                                            ROOT/venv  (onnxruntime numpy psutil)
    read events   <--stdout lines--         python -m slmedge.runtimes.bench.runner ... --events
    keep stdin open  --stdin-->             exits when stdin closes (connection gone)

Targets are URLs:

    ssh://[user@]host[:port][/dir][?python=python3&venv=1]    system OpenSSH client
    adb://[SERIAL][/dir][?python=python3&venv=0]              adb push / adb shell

The SSH side uses the system ``ssh`` binary, so ``~/.ssh/config``, agents, keys and jump
hosts apply; extra client options can be given in ``SLMEDGE_SSH_ARGS`` (shell-quoted,
e.g. ``-F /path/to/config``). ``SLMEDGE_ADB`` names the adb binary (default: on PATH).

Lost connection: the runner streams a partial result after load and after every round;
when the link drops the driver raises :class:`ConnectionLost` carrying the last partial
result (status ``partial``), and the runner on the target stops by itself: it watches its
stdin, which the SSH/ADB server closes when the connection goes (``--exit-on-stdin-eof``),
and it has a hard time limit (``--max-seconds``) in case that never happens.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from slmedge.runtimes.artifact import MANIFEST_NAME, open_artifact
from slmedge.runtimes.bench.runner import EVENT_PREFIX, BenchConfig
from slmedge.runtimes.errors import EXIT_ERROR, SlmEdgeError, UsageError

#: What the runner needs on the target (pip names). No tokenizers: the benchmark feeds
#: token ids, and tokenizers pulls in huggingface-hub and a dozen more packages.
REMOTE_REQUIREMENTS = ("onnxruntime>=1.20", "numpy>=1.24", "psutil>=5.9")
DEFAULT_SSH_DIR = ".cache/slmedge"  # relative to the login directory (the home)
DEFAULT_ADB_DIR = "/data/local/tmp/slmedge"
#: The runner stops itself after this long even if its connection never reports closing.
DEFAULT_MAX_SECONDS = 6 * 3600

Say = Callable[[str], None]


class RemoteError(SlmEdgeError):
    """The target could not be prepared, or the runner on it failed."""

    def __init__(self, message: str, partial: dict | None = None, exit_code: int = EXIT_ERROR):
        super().__init__(message)
        self.partial = partial
        self.exit_code = exit_code


class ConnectionLost(RemoteError):
    """The connection dropped while the benchmark ran; ``partial`` holds what was measured."""


# -- target URLs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A parsed ``ssh://`` or ``adb://`` target."""

    scheme: str  # "ssh" | "adb"
    host: str = ""  # ssh host, or the adb serial ("" = the only device)
    user: str | None = None
    port: int | None = None
    root: str = ""  # remote working directory
    python: str = "python3"
    venv: bool = True
    #: Where the venv's wheels come from: "target" (its pip reaches an index) or "host" (this
    #: machine downloads the target's wheels and copies them over: targets without internet).
    wheels: str = "target"

    def describe(self) -> str:
        if self.scheme == "adb":
            return f"adb://{self.host}"
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        return f"ssh://{user}{self.host}{port}"


def parse_target(url: str) -> Target:
    """Parse ``ssh://[user@]host[:port][/dir]`` or ``adb://[SERIAL][/dir]``
    (+ ``?python=&venv=&wheels=``)."""
    parts = urlsplit(url)
    if parts.scheme not in ("ssh", "adb"):
        raise UsageError(
            f"--target {url!r}: unknown scheme {parts.scheme or '(none)'!r}; use "
            "ssh://user@host[:port] or adb://SERIAL (adb:// for the only device)"
        )
    query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    unknown = sorted(set(query) - {"python", "venv", "wheels"})
    if unknown:
        raise UsageError(f"--target {url!r}: unknown option(s) {unknown}; known: python, venv, "
                         "wheels")
    wheels = query.get("wheels", "target").lower() or "target"
    if wheels not in ("target", "host"):
        raise UsageError(f"--target {url!r}: wheels must be 'target' (the target's pip downloads "
                         f"them) or 'host' (downloaded here, copied over), got {wheels!r}")
    path = unquote(parts.path)
    if path.startswith("/~/"):
        path = path[3:]  # ssh://host/~/dir -> dir under the home
    elif path in ("/", "/~"):
        path = ""
    venv_flag = query.get("venv", "1" if parts.scheme == "ssh" else "0").lower()
    if venv_flag not in ("0", "1", "yes", "no", "true", "false"):
        raise UsageError(f"--target {url!r}: venv must be 0 or 1, got {venv_flag!r}")
    venv = venv_flag in ("1", "yes", "true")
    if wheels == "host" and not venv:
        raise UsageError(f"--target {url!r}: wheels=host installs into the runner's venv; it "
                         "needs venv=1")
    python = query.get("python") or "python3"
    if parts.scheme == "adb":
        # A serial may contain ':' (adb over TCP: 192.168.1.5:5555): take the netloc as it is.
        return Target("adb", unquote(parts.netloc), root=path or DEFAULT_ADB_DIR,
                      python=python, venv=venv, wheels=wheels)
    host = parts.hostname
    if not host or host.startswith("-"):
        raise UsageError(f"--target {url!r}: no host; use ssh://user@host[:port]")
    try:
        port = parts.port
    except ValueError:
        raise UsageError(f"--target {url!r}: the port is not a number") from None
    return Target("ssh", host, user=unquote(parts.username) if parts.username else None,
                  port=port, root=path or DEFAULT_SSH_DIR, python=python, venv=venv,
                  wheels=wheels)


def q(path: str) -> str:
    """Quote for the target's POSIX shell (``sh``, ``mksh``, ``bash``)."""
    return shlex.quote(path)


# -- transports -------------------------------------------------------------------------------


def _exception_line(stderr: str) -> str:
    """The ``SomeError: message`` line of a Python traceback (else the last lines)."""
    for line in reversed(stderr.splitlines()):
        head = line.split(":", 1)[0].strip()
        if head and " " not in head and head.endswith(("Error", "Exception", "Interrupt")):
            return line.strip()[:500]
    return _tail(stderr, 3)


def _tail(text: str, lines: int = 6) -> str:
    kept = [ln for ln in text.strip().splitlines() if ln.strip()][-lines:]
    return " | ".join(kept)


class SshTransport:
    """Runs commands with the system OpenSSH client; copies files through ``tar`` over ssh."""

    def __init__(self, target: Target):
        self.target = target
        self.ssh = shutil.which("ssh")
        if not self.ssh:
            raise UsageError("--target ssh://...: no 'ssh' client on PATH; install OpenSSH")

    def argv(self, command: str) -> list[str]:
        t = self.target
        argv = [self.ssh, "-o", "ServerAliveInterval=10", "-o", "ServerAliveCountMax=3"]
        if not os.isatty(0):
            argv += ["-o", "BatchMode=yes"]  # never hang on a password prompt without a TTY
        argv += shlex.split(os.environ.get("SLMEDGE_SSH_ARGS", ""))
        if t.port:
            argv += ["-p", str(t.port)]
        if t.user:
            argv += ["-l", t.user]
        return [*argv, "--", t.host, command]

    def run(self, command: str, timeout: float = 300, input: bytes | None = None):
        return subprocess.run(self.argv(command), input=input, capture_output=True,
                              timeout=timeout)

    def popen(self, command: str) -> subprocess.Popen:
        return subprocess.Popen(self.argv(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)

    def upload(self, files: list[tuple[Path, str]], dest: str, say: Say) -> None:
        """Copy ``(local, relative name)`` pairs into ``dest`` atomically (dest.partial -> dest)."""
        part = dest + ".partial"
        cmd = (f"rm -rf {q(part)} && mkdir -p {q(part)} && tar -xf - -C {q(part)} && "
               f": > {q(part + '/.complete')} && rm -rf {q(dest)} && mv {q(part)} {q(dest)}")
        proc = subprocess.Popen(self.argv(cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        err = _Drain(proc.stderr)
        total = sum(p.stat().st_size for p, _ in files)
        say(f"copying {len(files)} files ({total / 1e6:.1f} MB) to {self.target.describe()}:{dest}")
        try:
            with tarfile.open(fileobj=proc.stdin, mode="w|") as tar:
                for local, name in files:
                    tar.add(str(local), arcname=name, recursive=False)
            proc.stdin.close()
        except BrokenPipeError:
            pass
        rc = proc.wait()
        if rc != 0:
            raise RemoteError(f"copying to {self.target.describe()}:{dest} failed "
                              f"(ssh exit {rc}): {_tail(err.text())}")


class AdbTransport:
    """Runs commands with ``adb shell`` and copies files with ``adb push``, one per file.

    ``adb shell`` joins its arguments with spaces and hands the line to the device's
    ``sh -c``; the command is therefore passed as one argument, already quoted with
    :func:`q`. ``adb push`` takes the device path literally (no shell), so it is not quoted.
    """

    def __init__(self, target: Target):
        self.target = target
        self.adb = os.environ.get("SLMEDGE_ADB") or shutil.which("adb")
        if not self.adb:
            raise UsageError("--target adb://...: no 'adb' on PATH; install the Android "
                             "platform tools (Debian: apt install adb) or set SLMEDGE_ADB")
        self.serial = target.host or self._only_device()

    def _only_device(self) -> str:
        out = subprocess.run([self.adb, "devices"], capture_output=True, text=True, timeout=60)
        devices = [ln.split("\t") for ln in out.stdout.splitlines()[1:] if "\t" in ln]
        ready = [s for s, state in devices if state.strip() == "device"]
        if len(ready) == 1:
            return ready[0]
        listed = ", ".join(f"{s} ({state.strip()})" for s, state in devices) or "none"
        if not ready:
            raise RemoteError(f"adb://: no device ready (adb devices: {listed}); connect one, "
                              "enable USB debugging and accept the prompt on the phone")
        raise UsageError(f"adb://: {len(ready)} devices are connected ({listed}); "
                         "name one: --target adb://SERIAL")

    def argv(self, command: str) -> list[str]:
        return [self.adb, "-s", self.serial, "shell", command]

    def run(self, command: str, timeout: float = 300, input: bytes | None = None):
        return subprocess.run(self.argv(command), input=input, capture_output=True,
                              timeout=timeout)

    def popen(self, command: str) -> subprocess.Popen:
        return subprocess.Popen(self.argv(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)

    def upload(self, files: list[tuple[Path, str]], dest: str, say: Say) -> None:
        part = dest + ".partial"
        dirs = sorted({str(Path(name).parent) for _, name in files} - {"."})
        mk = " ".join(q(f"{part}/{d}") for d in dirs)
        self._check(f"rm -rf {q(part)} && mkdir -p {q(part)} {mk}".rstrip(), "preparing")
        total = sum(p.stat().st_size for p, _ in files)
        say(f"pushing {len(files)} files ({total / 1e6:.1f} MB) to {self.target.describe()}:{dest}")
        for local, name in files:
            out = subprocess.run([self.adb, "-s", self.serial, "push", str(local),
                                  f"{part}/{name}"], capture_output=True, text=True, timeout=3600)
            if out.returncode != 0:
                raise RemoteError(f"adb push {local} failed: {_tail(out.stderr or out.stdout)}")
        self._check(f": > {q(part + '/.complete')} && rm -rf {q(dest)} && mv {q(part)} {q(dest)}",
                    "finishing the copy")

    def _check(self, command: str, what: str) -> None:
        out = self.run(command)
        if out.returncode != 0:
            raise RemoteError(f"{what} on {self.target.describe()} failed: "
                              f"{_tail((out.stderr or out.stdout).decode(errors='replace'))}")


def make_transport(target: Target):
    return SshTransport(target) if target.scheme == "ssh" else AdbTransport(target)


class _Drain:
    """Reads a pipe in a thread (so it never fills up), keeping the last lines."""

    def __init__(self, pipe, on_line: Callable[[str], None] | None = None, keep: int = 200):
        self.lines: deque[str] = deque(maxlen=keep)
        self.on_line = on_line
        self.thread = threading.Thread(target=self._run, args=(pipe,), daemon=True)
        self.thread.start()

    def _run(self, pipe) -> None:
        for raw in iter(pipe.readline, b""):
            line = raw.decode(errors="replace").rstrip("\r\n")
            self.lines.append(line)
            if self.on_line:
                self.on_line(line)

    def text(self) -> str:
        self.thread.join(timeout=5)
        return "\n".join(self.lines)


# -- what gets copied -------------------------------------------------------------------------


def _digest(items: list[tuple[str, bytes]]) -> str:
    h = hashlib.sha256()
    for name, data in items:
        h.update(name.encode() + b"\0" + data + b"\0")
    return h.hexdigest()[:12]


def artifact_files(path: str | Path) -> tuple[str, list[tuple[Path, str]]]:
    """The artifact's files and a cache key (hash of the manifest, which lists every
    file's sha256, so a changed artifact gets a fresh copy and an unchanged one is reused)."""
    artifact = open_artifact(path)
    if not (artifact.root / MANIFEST_NAME).is_file() or Path(path).is_file():
        raise UsageError(f"--target needs an artifact directory with {MANIFEST_NAME}; "
                         f"{path} is a bare model file")
    root = artifact.root
    files = sorted((p, p.relative_to(root).as_posix()) for p in root.rglob("*") if p.is_file())
    key = _digest([(MANIFEST_NAME, (root / MANIFEST_NAME).read_bytes())]
                  + [(name, str(p.stat().st_size).encode()) for p, name in files])
    return key, files


def runtime_files() -> tuple[str, list[tuple[Path, str]]]:
    """This torch-free package's source files, as ``slmedge/runtimes/...``, and their hash."""
    pkg = Path(__file__).resolve().parents[1]  # runtimes/, not runtimes/bench/
    files = sorted((p, f"slmedge/runtimes/{p.relative_to(pkg).as_posix()}")
                   for p in pkg.rglob("*.py") if "__pycache__" not in p.parts)
    return _digest([(name, p.read_bytes()) for p, name in files]), files


# -- the driver -------------------------------------------------------------------------------


@dataclass
class RemotePlan:
    """Where things go on the target."""

    target: Target
    artifact_dir: str
    lib_dir: str
    venv_dir: str
    result_file: str
    python: str = ""
    facts: dict = field(default_factory=dict)


def _probe(transport, plan: RemotePlan) -> dict:
    t = plan.target
    script = (
        f"mkdir -p {q(t.root)} && cd {q(t.root)} && "
        f"(test -f {q(plan.artifact_dir + '/.complete')} && echo artifact=ok; "
        f"test -f {q(plan.lib_dir + '/.complete')} && echo lib=ok; "
        f"test -f {q(plan.venv_dir + '/.slmedge-ready')} && "
        f"echo venv=$(cat {q(plan.venv_dir + '/.slmedge-ready')}); "
        f"echo uname=$(uname -sm); echo pwd=$(pwd); true)"
    )
    out = transport.run(script, timeout=120)
    if out.returncode != 0:
        stderr = out.stderr.decode(errors="replace")
        raise RemoteError(
            f"cannot reach {t.describe()} or prepare {t.root} there (exit {out.returncode}): "
            f"{_tail(stderr)}; check that `ssh`/`adb shell` works without a password prompt"
        )
    facts = {}
    for line in out.stdout.decode(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            facts[key.strip()] = value.strip()
    return facts


def _ensure_python(transport, plan: RemotePlan, say: Say) -> str:
    """Make or reuse the venv (or check the given Python); return the interpreter to run."""
    t = plan.target
    reqs = " ".join(REMOTE_REQUIREMENTS)
    if not t.venv:
        check = (f"cd {q(t.root)} && {q(t.python)} -c "
                 + q("import onnxruntime, numpy, psutil; print(onnxruntime.__version__)"))
        out = transport.run(check, timeout=300)
        if out.returncode != 0:
            raise RemoteError(
                f"the Python on {t.describe()} ({t.python}) cannot run the runner: "
                f"{_tail(out.stderr.decode(errors='replace'), 2)}; install onnxruntime numpy "
                "psutil for it (Termux: pkg install python python-numpy python-onnxruntime "
                "python-psutil), or name another: ?python=/path/to/python, or ?venv=1"
            )
        return t.python
    python = f"{plan.venv_dir}/bin/python"
    if plan.facts.get("venv") == reqs:
        say(f"reusing the venv on {t.describe()} ({t.root}/{plan.venv_dir})")
        return python
    source = ""
    if t.wheels == "host":
        wheels = host_wheels(transport, t, say)
        transport.upload([(w, w.name) for w in wheels], f"{t.root}/{WHEELS_DIR}", say)
        # --no-index: nothing is fetched by the target; every wheel came from this machine
        source = f"--no-index --find-links {q(WHEELS_DIR)} "
    say(f"making a venv on {t.describe()} ({t.root}/{plan.venv_dir}): pip install {reqs}"
        + (" from wheels downloaded here" if source else ""))
    # --system-site-packages: an onnxruntime installed system-wide (e.g. by apt) is used as is.
    script = (
        f"cd {q(t.root)} && {q(t.python)} -m venv --system-site-packages {q(plan.venv_dir)} && "
        f"{q(python)} -m pip install --disable-pip-version-check -q {source}"
        + " ".join(q(r) for r in REMOTE_REQUIREMENTS)
        + f" && printf '%s\\n' {q(reqs)} > {q(plan.venv_dir + '/.slmedge-ready')}"
    )
    out = transport.run(script, timeout=1800)
    if out.returncode != 0:
        access = ("the wheels copied from this machine (a dependency may have no wheel for "
                  "the target: see the error)" if source else
                  "access to PyPI (or ?wheels=host: this machine downloads the wheels)")
        raise RemoteError(
            f"making the Python environment on {t.describe()} failed (exit {out.returncode}): "
            f"{_tail(out.stderr.decode(errors='replace'))}; the target needs python3 with the "
            f"venv module (Debian/Raspberry Pi OS: sudo apt install python3-venv) and {access}, "
            "or pre-installed packages with ?venv=0"
        )
    return python


#: Where host-downloaded wheels go on the target (under its root).
WHEELS_DIR = "wheels"


def target_platform(transport, target: Target) -> dict:
    """The target Python's version, machine and C library, as pip's platform tags need them."""
    code = ("import platform, sys; lib, ver = platform.libc_ver(); "
            "print(sys.version_info[0], sys.version_info[1], platform.machine(), lib or '-', "
            "ver or '-')")
    out = transport.run(f"{q(target.python)} -c {q(code)}", timeout=300)
    fields = out.stdout.decode(errors="replace").split()
    if out.returncode != 0 or len(fields) != 5:
        raise RemoteError(
            f"cannot read the Python version and platform of {target.describe()} "
            f"({target.python}): {_tail(out.stderr.decode(errors='replace'), 2)}; check that "
            "python3 runs there, or name it with ?python=/path/to/python")
    major, minor, machine, libc, libc_version = fields
    return {"python": (int(major), int(minor)), "machine": machine, "libc": libc,
            "libc_version": libc_version}


def pip_platforms(machine: str, libc: str, libc_version: str) -> list[str]:
    """pip ``--platform`` tags a glibc Linux target accepts, newest first (PEP 600)."""
    if libc != "glibc":
        raise RemoteError(
            f"wheels=host supports glibc Linux targets; this one reports libc {libc!r} "
            f"({machine}): install onnxruntime, numpy and psutil there and use ?venv=0")
    try:
        glibc_minor = int(libc_version.split(".")[1])
    except (IndexError, ValueError):
        raise RemoteError(f"cannot read the target's glibc version {libc_version!r}") from None
    tags = [f"manylinux_2_{m}_{machine}" for m in range(glibc_minor, 16, -1)]
    return tags + [f"manylinux2014_{machine}"]


def host_wheels(transport, target: Target, say: Say, cache: Path | None = None) -> list[Path]:
    """Download, on this machine, the wheels the runner's venv needs on ``target``.

    ``pip download`` with the target's platform tags and Python version (binary wheels only,
    dependencies resolved for the target); cached per platform under ``~/.cache/slmedge``."""
    info = target_platform(transport, target)
    major, minor = info["python"]
    platforms = pip_platforms(info["machine"], info["libc"], info["libc_version"])
    key = f"cp{major}{minor}-{platforms[0]}"
    cache = cache or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") \
        / "slmedge" / "wheels" / key
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q",
           "--only-binary=:all:", "--python-version", f"{major}.{minor}",
           "--implementation", "cp", "-d", str(cache)]
    for tag in platforms:
        cmd += ["--platform", tag]
    say(f"downloading the runner's wheels for {target.describe()} ({key}) into {cache}")
    out = subprocess.run(cmd + list(REMOTE_REQUIREMENTS), capture_output=True, text=True)
    if out.returncode != 0:
        raise RemoteError(
            f"downloading wheels for {target.describe()} ({key}: Python {major}.{minor}, "
            f"{info['machine']}, glibc {info['libc_version']}) failed: {_tail(out.stderr)}; "
            "this machine needs pip and access to PyPI (or a local index in pip.conf)")
    wheels = sorted(cache.glob("*.whl"))
    if not wheels:
        raise RemoteError(f"pip download left no wheel in {cache}")
    return wheels


def _lost_message(target: Target, partial: dict | None, rc: int, stderr: str, kept: str) -> str:
    if partial is None:
        when = "before the model loaded"
    else:
        when = (f"after load and {partial.get('rounds_done', 0)} of "
                f"{partial.get('repeats', '?')} measured rounds")
    how = f"signal {-rc}" if rc < 0 else f"exit {rc}"
    return (f"lost the connection to {target.describe()} during the benchmark ({when}; "
            f"{how}: {_tail(stderr, 2) or 'no message'}); {kept}; the runner on the target "
            "stops by itself when its connection closes")


def run_remote_bench(
    target_url: str,
    artifact: str | Path,
    config: BenchConfig | None = None,
    *,
    providers=None,
    strict: bool = False,
    allow_cpu_fallback: bool = True,
    progress: Say | None = None,
    partial_path: str | Path | None = None,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    on_started: Callable[[subprocess.Popen], None] | None = None,
) -> dict:
    """Run the benchmark on ``target_url``; return the result document (``target`` set).

    ``providers`` / ``strict`` / ``allow_cpu_fallback`` are handed to the runner's session
    on the target, as :func:`~slmedge.runtimes.bench.runner.run_bench` takes them locally.

    On a lost connection, raises :class:`ConnectionLost` whose ``partial`` is the result
    as measured so far (status ``partial``), also written to ``partial_path`` if given.
    """
    say = progress or (lambda _msg: None)
    config = config or BenchConfig()
    target = parse_target(target_url)
    art_key, art_files = artifact_files(artifact)
    lib_key, lib_files = runtime_files()
    name = Path(artifact).resolve().name
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    plan = RemotePlan(target, artifact_dir=f"artifacts/{name}-{art_key}",
                      lib_dir=f"lib/{lib_key}", venv_dir="venv",
                      result_file=f"results/{stamp}-{name}.json")
    transport = make_transport(target)
    if isinstance(transport, AdbTransport):
        target = replace(target, host=transport.serial)
        plan.target = target
    say(f"connecting to {target.describe()}")
    plan.facts = _probe(transport, plan)
    if plan.facts.get("artifact") == "ok":
        say(f"artifact already on {target.describe()} ({plan.artifact_dir})")
    else:
        transport.upload(art_files, f"{target.root}/{plan.artifact_dir}", say)
    if plan.facts.get("lib") != "ok":
        transport.upload(lib_files, f"{target.root}/{plan.lib_dir}", say)
    python = _ensure_python(transport, plan, say)
    cfg = config.to_dict()
    cfg["label"] = cfg["label"] or name
    args = [python, "-u", "-m", "slmedge.runtimes.bench.runner", plan.artifact_dir,
            "--config-json", json.dumps(cfg), "--events", "--exit-on-stdin-eof",
            "--max-seconds", str(max_seconds), "--output", plan.result_file]
    if providers:
        args += ["--providers-json", json.dumps([list(p) for p in providers])]
    if strict:
        args.append("--strict")
    if not allow_cpu_fallback:
        args.append("--no-cpu-fallback")
    command = (f"cd {q(target.root)} && PYTHONPATH={q(plan.lib_dir)} exec "
               + " ".join(q(a) for a in args))
    say(f"running the benchmark on {target.describe()}")
    return _stream_run(transport, command, target, say, partial_path, on_started)


def _stream_run(transport, command: str, target: Target, say: Say, partial_path,
                on_started) -> dict:
    proc = transport.popen(command)
    if on_started:
        on_started(proc)
    err = _Drain(proc.stderr)
    partial: dict | None = None
    result: dict | None = None
    failure: dict | None = None
    try:
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode(errors="replace").rstrip("\r\n")
            if not line.startswith(EVENT_PREFIX):
                continue  # login banners, shell noise
            try:
                event = json.loads(line[len(EVENT_PREFIX):])
            except json.JSONDecodeError:
                continue  # a line cut by the connection dropping
            kind = event.get("event")
            if kind == "progress":
                say(f"[{target.describe()}] {event.get('message', '')}")
            elif kind == "partial":
                partial = event["result"]
            elif kind == "result":
                result = event["result"]
            elif kind == "error":
                failure = event
        rc = proc.wait()
    finally:
        # Closing stdin is the runner's signal to stop (it also stops on its own at the end).
        with contextlib.suppress(OSError):
            proc.stdin.close()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
    stderr = err.text()
    if result is not None:
        result["target"] = target.describe()
        return result
    failed = failure is not None or "Traceback (most recent call last)" in stderr
    reason = failure.get("message") if failure else _exception_line(stderr)
    if partial is not None:
        kept = f"partial results ({partial.get('rounds_done', 0)} measured rounds) kept"
        why = (f"the runner failed: {reason}" if failed
               else _lost_message(target, partial, rc, stderr, "partial results kept"))
        partial = dict(partial, status="partial", target=target.describe(), error=why)
        if partial_path:
            Path(partial_path).write_text(json.dumps(partial, indent=2) + "\n")
            kept += f" in {partial_path}"
    else:
        kept = "nothing was measured yet"
    if failure is not None:
        raise RemoteError(f"the benchmark on {target.describe()} failed: {reason}"
                          + (f"; {kept}" if partial else ""), partial,
                          exit_code=int(failure.get("exit_code", EXIT_ERROR)))
    if failed:
        phase = partial.get("phase", "load") if partial else "before the model loaded"
        raise RemoteError(f"the runner on {target.describe()} crashed during {phase} (exit {rc}): "
                          f"{reason}; {kept}", partial)
    # ssh: 255 (its own error), EXIT_HANGUP (the runner saw its stdin close), a signal;
    # adb: 1 when the device goes away. Without a result or an error event, the link went.
    raise ConnectionLost(_lost_message(target, partial, rc, stderr, kept), partial)
