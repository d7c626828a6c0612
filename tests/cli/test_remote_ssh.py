"""``slmedge bench --target ssh://...`` end to end, against a real sshd started here on 127.0.0.1.

The sshd runs as this user on a random free port with its own host key, client key and
config (no system files touched beyond the privilege-separation directory root's sshd
needs). The client side is the system ``ssh`` with an ``-F`` config given through
``SLMEDGE_SSH_ARGS``, exactly as a user's ``~/.ssh/config`` would be read.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from slmedge.runtimes.bench.runner import BenchConfig
from slmedge.runtimes.bench.schema import validate_result
from slmedge.runtimes.bench.remote import ConnectionLost, RemoteError, run_remote_bench

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
FAST = BenchConfig(prompt_tokens=8, new_tokens=4, warmup=0, repeats=2, prompt_buckets=(8, 16),
                   decode_depths=(8,), threads=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Sshd:
    """A throw-away sshd on 127.0.0.1 and a client config that reaches it."""

    def __init__(self, home: Path):
        self.home = home
        self.user = getpass.getuser()
        self.port = _free_port()
        for name in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                            str(home / name)], check=True, timeout=60)
        shutil.copy(home / "client_key.pub", home / "authorized_keys")
        (home / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {home}/host_key\n"
            f"PidFile {home}/sshd.pid\nAuthorizedKeysFile {home}/authorized_keys\n"
            "StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            f"UsePAM no\nPermitRootLogin prohibit-password\nAllowUsers {self.user}\n"
            "PrintMotd no\nAllowTcpForwarding no\nX11Forwarding no\n"
            "ClientAliveInterval 5\nClientAliveCountMax 2\n"
        )
        (home / "ssh_config").write_text(
            f"Host slmedge-pi\n  HostName 127.0.0.1\n  Port {self.port}\n  User {self.user}\n"
            f"Host *\n  IdentityFile {home}/client_key\n  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {home}/known_hosts\n  GlobalKnownHostsFile /dev/null\n"
            "  StrictHostKeyChecking accept-new\n  LogLevel ERROR\n  ConnectTimeout 10\n"
        )
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privsep chroot
        self.proc = subprocess.Popen([SSHD, "-D", "-E", str(home / "sshd.log"),
                                      "-f", str(home / "sshd_config")])

        def listening():
            if self.proc.poll() is not None:
                log = home / "sshd.log"
                raise AssertionError(f"sshd exited: {log.read_text()[-2000:] if log.exists() else ''}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        _wait(listening, 20, "sshd to listen")

    @property
    def ssh_args(self) -> str:
        return f"-F {self.home}/ssh_config"

    def connection_processes(self) -> list[psutil.Process]:
        """The per-connection sshd processes (children of the listener, and theirs)."""
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        return [p for p in kids if _name(p).startswith("sshd")]

    def stop(self) -> None:
        for p in self.connection_processes():
            p.kill()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def _name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.Error:
        return ""


def runners_in(root: Path) -> list[psutil.Process]:
    """Runner processes working in ``root`` (the remote directory)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "slmedge.runtimes.bench.runner" in (p.info["cmdline"] or []) and \
                    Path(p.cwd()) == root.resolve():
                found.append(p)
        except psutil.Error:
            continue
    return found


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    if not os.access(SSHD, os.X_OK):
        pytest.fail("sshd is missing: run tools/setup.sh (apt-get install openssh-server)")
    server = Sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ssh_env(sshd):
    mp = pytest.MonkeyPatch()
    mp.setenv("SLMEDGE_SSH_ARGS", sshd.ssh_args)
    yield sshd
    mp.undo()


@pytest.fixture(scope="module")
def spaced_artifact(tiny_artifact, tmp_path_factory):
    """The tiny artifact under a name with a space (quoting is part of the test)."""
    dst = tmp_path_factory.mktemp("art") / "tiny model"
    shutil.copytree(tiny_artifact("llama"), dst)
    return dst


@pytest.fixture(scope="module")
def remote_root(tmp_path_factory):
    # one remote directory for the module: the first test makes the venv, later ones reuse it
    return tmp_path_factory.mktemp("remote") / "slmedge remote"


def test_bench_over_ssh_end_to_end_then_reuses_the_copy_and_the_venv(
        ssh_env, spaced_artifact, remote_root, tmp_path):
    messages: list[str] = []
    url = f"ssh://slmedge-pi{remote_root}"  # host alias from the ssh config file
    result = run_remote_bench(url, spaced_artifact, FAST, progress=messages.append)
    r = validate_result(result)
    assert r.status == "complete" and r.target == "ssh://slmedge-pi"
    assert r.label == "tiny model" and r.rounds_done == 2
    assert [b.prompt_tokens for b in r.ttft] == [8, 16]
    # it ran in the venv made on the "target", from the copied runtime
    assert r.environment.executable == f"{remote_root}/venv/bin/python"
    assert any("making a venv" in m for m in messages)
    copied = list((remote_root / "artifacts").iterdir())
    assert len(copied) == 1 and copied[0].name.startswith("tiny model-")
    assert (copied[0] / "model.onnx").read_bytes() == (spaced_artifact / "model.onnx").read_bytes()
    lib = next((remote_root / "lib").iterdir())
    assert (lib / "slmedge" / "runtimes" / "bench" / "runner.py").is_file()
    assert not list(lib.rglob("torch*"))
    venv_site = list((remote_root / "venv").glob("lib/python*/site-packages"))[0]
    assert (venv_site / "onnxruntime").is_dir() and not (venv_site / "torch").exists()
    # the runner kept its own copy of the result on the target
    kept = list((remote_root / "results").glob("*.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text())["label"] == "tiny model"

    messages.clear()
    again = run_remote_bench(url, spaced_artifact, FAST, progress=messages.append)
    assert validate_result(again).status == "complete"
    assert any("reusing the venv" in m for m in messages)
    assert any("artifact already on" in m for m in messages)
    assert not any(m.startswith("copying") for m in messages)


def test_cli_bench_target_ssh_user_host_port(ssh_env, spaced_artifact, remote_root, tmp_path):
    out = tmp_path / "r.json"
    url = f"ssh://{ssh_env.user}@127.0.0.1:{ssh_env.port}{remote_root}"
    proc = subprocess.run(
        [sys.executable, "-m", "slmedge.tools.cli", "bench", str(spaced_artifact), "--target", url,
         "--prompt-tokens", "8", "--new-tokens", "4", "--warmup", "0", "--repeats", "2",
         "--prompt-buckets", "8", "--depths", "8", "--json", "--output", str(out)],
        capture_output=True, text=True, timeout=600, env=os.environ.copy(),
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)  # exactly one JSON document on stdout
    assert doc == json.loads(out.read_text())
    assert doc["target"] == f"ssh://{ssh_env.user}@127.0.0.1:{ssh_env.port}"
    for key in ("ttft_ms", "decode_tokens_per_s", "peak_rss_mb", "model_size_mb", "load_s"):
        assert doc[key] > 0


@pytest.mark.parametrize("side", ["server", "client"])
def test_killed_connection_keeps_partial_results_and_stops_the_remote_runner(
        ssh_env, spaced_artifact, remote_root, tmp_path, side):
    """Kill the connection after the first measured round: the server's per-connection
    sshd processes (the link dropping on the Pi's side), or the local ssh client."""
    long_run = BenchConfig(prompt_tokens=8, new_tokens=64, warmup=0, repeats=100000,
                           prompt_buckets=(8,), decode_depths=(8,), threads=1)
    started: list[subprocess.Popen] = []
    killed = threading.Event()
    running_before_kill: list[int] = []

    def progress(message: str) -> None:
        if "round 2/" in message and not killed.is_set():  # round 1's partial is in
            killed.set()
            running_before_kill.append(len(runners_in(remote_root)))
            if side == "server":
                for p in ssh_env.connection_processes():
                    p.send_signal(signal.SIGKILL)
            else:
                started[0].kill()

    partial_file = tmp_path / "partial.json"
    with pytest.raises(ConnectionLost) as err:
        run_remote_bench(f"ssh://slmedge-pi{remote_root}", spaced_artifact, long_run,
                         progress=progress, partial_path=partial_file,
                         on_started=started.append, max_seconds=300)
    # ConnectionLost, not the runner's own --max-seconds stop: no wall-clock bound needed
    assert killed.is_set()
    assert running_before_kill == [1]  # the runner was found on the target while it ran
    message = str(err.value)
    print(message)
    assert "lost the connection to ssh://slmedge-pi" in message
    assert str(partial_file) in message and "round" in message
    partial = json.loads(partial_file.read_text())
    r = validate_result(partial)
    assert r.status == "partial" and r.rounds_done >= 1 and r.error
    assert r.decode and r.decode[0].tokens_per_s.n >= 1  # the measured round is kept
    assert err.value.partial["rounds_done"] == r.rounds_done
    # nothing left running on the target
    _wait(lambda: not runners_in(remote_root), 30, "the remote runner to stop")
    _wait(lambda: not ssh_env.connection_processes(), 30, "the sshd session to end")


def test_unreachable_target_is_a_clear_error(ssh_env, spaced_artifact, tmp_path):
    closed = _free_port()
    with pytest.raises(RemoteError, match=r"cannot reach ssh://nobody@127\.0\.0\.1:\d+"):
        run_remote_bench(f"ssh://nobody@127.0.0.1:{closed}/x", spaced_artifact, FAST)


def test_cli_maps_a_lost_connection_to_exit_code_1(monkeypatch, capsys, spaced_artifact):
    from slmedge.tools.cli.app import main

    def lost(*_a, **_k):
        raise ConnectionLost("lost the connection to ssh://pi during the benchmark (after load "
                             "and 1 of 3 measured rounds; exit 255: ...); partial results "
                             "written to p.json", {"rounds_done": 1})

    monkeypatch.setattr("slmedge.runtimes.bench.remote.run_remote_bench", lost)
    assert main(["bench", str(spaced_artifact), "--target", "ssh://pi", "--json"]) == 1
    captured = capsys.readouterr()
    error = json.loads(captured.out)["error"]  # one document: the error, not half a result
    assert error["exit_code"] == 1 and error["type"] == "ConnectionLost"
    assert error["partial"] == {"rounds_done": 1} and "ssh://pi" in error["message"]
    assert "slmedge bench: error: lost the connection to ssh://pi" in captured.err
