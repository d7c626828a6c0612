"""``slmedge bench --fleet``: three real sshd on 127.0.0.1 (one killed mid-run), the fleet file's
validation, the per-device timeout, the merged JSON and the HTML report's per-device rows.

The sshd helper is test_remote_ssh.py's; each server has its own client key, so the test writes
one ssh config with a host alias per device (as a user's ``~/.ssh/config`` would).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_remote_ssh import SSHD, Sshd

from slmedge.runtimes.bench.runner import BenchConfig
from slmedge.runtimes.bench.schema import validate_result
from slmedge.runtimes.errors import UsageError
from slmedge.runtimes.bench.fleet import load_fleet, run_fleet

DEVICES = ("pi-a", "pi-b", "pi-c")
VICTIM = "pi-b"


@pytest.fixture(scope="module")
def three_sshd(tmp_path_factory):
    if not os.access(SSHD, os.X_OK):
        pytest.fail("sshd is missing: run tools/setup.sh (apt-get install openssh-server)")
    servers = {}
    try:
        for name in DEVICES:
            servers[name] = Sshd(tmp_path_factory.mktemp(f"sshd-{name}"))
        config = tmp_path_factory.mktemp("ssh-client") / "ssh_config"
        config.write_text("".join(
            f"Host {name}\n  HostName 127.0.0.1\n  Port {s.port}\n  User {s.user}\n"
            f"  IdentityFile {s.home}/client_key\n  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {s.home}/known_hosts\n  GlobalKnownHostsFile /dev/null\n"
            "  StrictHostKeyChecking accept-new\n  LogLevel ERROR\n  ConnectTimeout 10\n"
            "  ServerAliveInterval 2\n  ServerAliveCountMax 2\n"
            for name, s in servers.items()))
        yield servers, config
    finally:
        for s in servers.values():
            s.stop()


@pytest.fixture(scope="module")
def artifact(tiny_artifact):
    return tiny_artifact("llama")


def _fleet_file(tmp_path: Path, remote: Path, timeout: float = 300) -> Path:
    # ?venv=0: the runner uses this test's Python (onnxruntime is there) - no pip on "the Pi"
    py = sys.executable
    lines = [f"timeout_s: {timeout}", "devices:"]
    for name in DEVICES:
        lines += [f"  - name: {name}", f"    target: ssh://{name}{remote}/{name}?venv=0&python={py}",
                  "    tags: [pi, arm64]" if name != "pi-c" else "    tags: [pi]"]
    path = tmp_path / "fleet.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_three_sshd_one_killed_mid_run_two_complete_one_error(three_sshd, artifact, tmp_path):
    servers, ssh_config = three_sshd
    fleet_path = _fleet_file(tmp_path, tmp_path / "remote")
    # enough rounds that the victim is still running when its server dies at round 2
    config = BenchConfig(prompt_tokens=8, new_tokens=16, warmup=0, repeats=40,
                         prompt_buckets=(8,), decode_depths=(8,), threads=1)
    killed = threading.Event()
    lines: list[tuple[str, str]] = []

    def progress(device: str, message: str) -> None:
        lines.append((device, message))
        if device == VICTIM and "round 2/" in message and not killed.is_set():
            killed.set()
            servers[VICTIM].stop()  # the listener and its connections: the Pi went away

    os.environ["SLMEDGE_SSH_ARGS"] = f"-F {ssh_config}"
    try:
        merged = run_fleet(load_fleet(fleet_path), [artifact], config, progress=progress,
                           fleet_path=str(fleet_path))
    finally:
        del os.environ["SLMEDGE_SSH_ARGS"]
    assert killed.is_set()
    assert sorted(r["device"] for r in merged["results"]) == ["pi-a", "pi-c"]
    for r in merged["results"]:
        v = validate_result(r)
        assert v.status == "complete" and v.rounds_done == 40 and v.device == r["device"]
        assert v.target == f"ssh://{r['device']}"
    [err] = merged["errors"]
    assert err["device"] == VICTIM and err["type"] == "ConnectionLost"
    assert err["message"].startswith(f"device {VICTIM} (ssh://{VICTIM}")
    assert "lost the connection" in err["message"]
    assert err["partial"] and err["partial"]["rounds_done"] >= 1  # what was measured is kept
    status = {d["name"]: d["status"] for d in merged["devices"]}
    assert status == {"pi-a": "ok", "pi-b": "failed", "pi-c": "ok"}
    # progress came per device
    assert {d for d, _ in lines} == set(DEVICES)


def test_cli_fleet_json_merged_file_report_and_store(three_sshd, artifact, tmp_path):
    """Through the CLI with the surviving servers (pi-b stays dead from the test above, or is
    killed now): one JSON document, -o file, per-device rows in the HTML report, the store."""
    servers, ssh_config = three_sshd
    servers[VICTIM].stop()  # idempotent: pi-b is down for this run
    fleet_path = _fleet_file(tmp_path, tmp_path / "remote", timeout=240)
    merged_path, store = tmp_path / "merged.json", tmp_path / "results.sqlite"
    env = dict(os.environ, SLMEDGE_SSH_ARGS=f"-F {ssh_config}")
    proc = subprocess.run(
        [sys.executable, "-m", "slmedge.tools.cli", "bench", str(artifact), "--fleet",
         str(fleet_path), "--tags", "pi", "--prompt-tokens", "8", "--new-tokens", "4",
         "--warmup", "0", "--repeats", "1", "--prompt-buckets", "8", "--depths", "8",
         "--threads", "1", "--json", "-o", str(merged_path), "--store", str(store)],
        capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 1, proc.stderr  # a device failed: exit 1, the rest complete
    doc = json.loads(proc.stdout)
    assert doc == json.loads(merged_path.read_text())
    assert sorted(r["device"] for r in doc["results"]) == ["pi-a", "pi-c"]
    assert [e["device"] for e in doc["errors"]] == [VICTIM]
    assert "cannot reach ssh://pi-b" in doc["errors"][0]["message"]
    for name in DEVICES:
        assert f"[{name}] " in proc.stderr  # progress per device

    html_path = tmp_path / "report.html"
    rep = subprocess.run([sys.executable, "-m", "slmedge.tools.cli", "report", str(merged_path),
                          "-o", str(html_path)], capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0, rep.stderr
    page = html_path.read_text()
    label = artifact.name
    assert f"{label} (fp32) @ pi-a" in page and f"{label} (fp32) @ pi-c" in page
    assert "failed: device pi-b (ssh://pi-b" in page

    from slmedge.runtimes.bench.results_store import ResultsStore

    with ResultsStore(store) as s:
        assert sorted(r.device for r in s.query(kind="bench")) == ["pi-a", "pi-c"]
        assert [r.device for r in s.query(kind="fleet-error")] == [VICTIM]
        assert [r.device for r in s.query(device="pi-c")] == ["pi-c"]


def test_tags_select_devices_and_unknown_tags_are_an_error(tmp_path):
    fleet = load_fleet(_fleet_file(tmp_path, tmp_path))
    assert [d.name for d in fleet.select(["arm64"])] == ["pi-a", "pi-b"]
    assert len(fleet.select(None)) == 3
    with pytest.raises(UsageError, match=r"--tags gpu: no device .* tags in the fleet: arm64, pi"):
        fleet.select(["gpu"])


@pytest.mark.parametrize("text, expected", [
    ("devices:\n  - name: a\n    target: ftp://x\n",
     r"fleet .*fleet.yaml: field devices\[0\] \(a\)\.target: .*unknown scheme 'ftp'"),
    ("devices:\n  - name: a\n    target: local\n    colour: red\n",
     r"field devices\[0\] \(a\)\.colour: unknown field; allowed fields here: name, target, "
     r"profile, tags, timeout_s"),
    ("devices:\n  - target: local\n", r"field devices\[0\]\.name: required"),
    ("devices:\n  - {name: a, target: local}\n  - {name: a, target: local}\n",
     r"the name 'a' is used twice"),
    ("devices: []\n", r"field devices: .*at least 1"),
    ("timeout: 5\ndevices:\n  - {name: a, target: local}\n",
     r"field timeout: unknown field; allowed fields here: timeout_s, devices"),
    ("- a\n", r"expected a mapping with a 'devices:' list"),
])
def test_fleet_file_errors_name_the_file_and_the_field(tmp_path, text, expected):
    path = tmp_path / "fleet.yaml"
    path.write_text(text)
    with pytest.raises(UsageError, match=expected):
        load_fleet(path)


def test_a_slow_device_times_out_without_blocking_the_others(tmp_path, artifact):
    """A device whose bench never ends (a process that sleeps) is killed at its timeout; the
    local device completes a real bench meanwhile."""
    path = tmp_path / "fleet.yaml"
    path.write_text("devices:\n  - {name: here, target: local}\n"
                    "  - {name: stuck, target: 'ssh://stuck', timeout_s: 3}\n")
    sleepers: list[subprocess.Popen] = []

    def bench_fn(device, art, config, *, on_started, **kwargs):
        if device.name == "here":
            from slmedge.runtimes.bench.fleet import run_local_bench

            return run_local_bench(art, config, on_started=on_started, **kwargs)
        proc = subprocess.Popen(["sleep", "300"])
        sleepers.append(proc)
        on_started(proc)
        proc.wait()
        raise RuntimeError(f"the stuck device's process ended with {proc.returncode}")

    config = BenchConfig(prompt_tokens=8, new_tokens=4, warmup=0, repeats=1, prompt_buckets=(8,),
                         decode_depths=(8,), threads=1)
    merged = run_fleet(load_fleet(path), [artifact], config, bench_fn=bench_fn)
    assert [r["device"] for r in merged["results"]] == ["here"]
    assert validate_result(merged["results"][0]).target == "local"
    [err] = merged["errors"]
    assert err["device"] == "stuck" and "timed out after 3 s" in err["message"]
    assert sleepers[0].poll() is not None  # killed, not left behind


def test_timeout_while_preparing_the_target_kills_its_ssh_clients(tmp_path, tmp_path_factory,
                                                                  artifact, monkeypatch):
    """A Pi whose sshd accepts the connection but never answers (stopped): the probe's
    ``ssh`` would wait for its ConnectTimeout (60 s here); the device's 2 s limit kills it."""
    import psutil

    frozen = Sshd(tmp_path_factory.mktemp("sshd-frozen"))
    os.kill(frozen.proc.pid, signal.SIGSTOP)
    try:
        # the command line's -o wins over the config file's ConnectTimeout 10
        monkeypatch.setenv("SLMEDGE_SSH_ARGS", f"-o ConnectTimeout=60 {frozen.ssh_args}")
        path = tmp_path / "fleet.yaml"
        target = f"ssh://{frozen.user}@127.0.0.1:{frozen.port}{tmp_path}/r"
        path.write_text(f"devices:\n  - {{name: frozen, target: '{target}', timeout_s: 2}}\n")
        merged = run_fleet(load_fleet(path), [artifact], BenchConfig(
            prompt_tokens=8, new_tokens=4, warmup=0, repeats=1, prompt_buckets=(8,),
            decode_depths=(8,), threads=1))
        [err] = merged["errors"]
        assert err["device"] == "frozen" and "timed out after 2 s" in err["message"]

        def live_clients():
            found = []
            for p in psutil.Process().children(recursive=True):
                try:
                    if p.name() == "ssh" and str(frozen.port) in p.cmdline() and \
                            p.status() != psutil.STATUS_ZOMBIE:
                        found.append(p)
                except psutil.Error:
                    continue
            return found

        deadline = time.monotonic() + 5  # well before the client's own 60 s ConnectTimeout
        while live_clients() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not live_clients()
    finally:
        os.kill(frozen.proc.pid, signal.SIGCONT)
        frozen.stop()
