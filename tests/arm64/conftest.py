"""An emulated arm64 target: Debian bookworm arm64 (tools/setup_arm64.sh, cached outside the
checkout) with its own aarch64 sshd, run through qemu-user via binfmt_misc, on 127.0.0.1.

    host (x86)                               chroot ROOT (aarch64 under qemu-user)
    ssh -F client config  --127.0.0.1:PORT-->  /usr/sbin/sshd -D (root, key only)
                                              /root/.cache/slmedge/venv  (onnxruntime aarch64
                                              wheel from PyPI; made once, kept in ROOT)

The tests skip, with the set-up script's reason, where the target cannot exist (not root,
no binfmt_misc); ``SLMEDGE_SKIP_ARM64=1`` skips them on purpose.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SETUP = REPO / "tools" / "setup_arm64.sh"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pytest_collection_modifyitems(session, config, items):
    """Run the arm64 tests last: tools/test.sh builds the root filesystem in the background
    (minutes, the first time) while the other tests run; the fixture then waits for it."""
    here = Path(__file__).parent
    items.sort(key=lambda item: here in Path(str(item.path)).parents)


@pytest.fixture(scope="session")
def arm64_root() -> Path:
    """The arm64 root filesystem, built on first use (minutes) and reused afterwards."""
    if os.environ.get("SLMEDGE_SKIP_ARM64") == "1":
        pytest.skip("SLMEDGE_SKIP_ARM64=1")
    t0 = time.monotonic()
    out = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=3600)
    if out.returncode == 2:
        pytest.skip(out.stderr.strip().splitlines()[-1])
    if out.returncode != 0:
        pytest.fail(f"tools/setup_arm64.sh failed (exit {out.returncode}) after "
                    f"{time.monotonic() - t0:.0f} s:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


class ChrootSshd:
    """The rootfs's own sshd (an aarch64 binary) on 127.0.0.1, with keys made here."""

    def __init__(self, root: Path, home: Path):
        self.root, self.home = root, home
        self.port = _free_port()
        self.conf = root / "etc" / "slmedge-test" / str(self.port)  # seen inside as /etc/...
        inner = f"/etc/slmedge-test/{self.port}"
        self.conf.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                        str(self.conf / "host_key")], check=True, timeout=60)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                        str(home / "client_key")], check=True, timeout=60)
        shutil.copy(home / "client_key.pub", self.conf / "authorized_keys")
        (self.conf / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {inner}/host_key\n"
            f"PidFile {inner}/sshd.pid\nAuthorizedKeysFile {inner}/authorized_keys\n"
            "StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "UsePAM no\nPermitRootLogin prohibit-password\nAllowUsers root\nPrintMotd no\n"
            "AllowTcpForwarding no\nX11Forwarding no\nClientAliveInterval 15\n"
            "ClientAliveCountMax 4\nLoginGraceTime 300\n")
        (home / "ssh_config").write_text(
            f"Host *\n  IdentityFile {home}/client_key\n  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {home}/known_hosts\n  GlobalKnownHostsFile /dev/null\n"
            "  StrictHostKeyChecking accept-new\n  LogLevel ERROR\n  ConnectTimeout 60\n")
        (root / "run" / "sshd").mkdir(parents=True, exist_ok=True)
        self.log = self.conf / "sshd.log"
        self.proc = subprocess.Popen(["chroot", str(root), "/usr/sbin/sshd", "-D", "-E",
                                      f"{inner}/sshd.log", "-f", f"{inner}/sshd_config"])
        deadline = time.monotonic() + 120  # sshd starts in seconds under qemu; be patient
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"the arm64 sshd exited ({self.proc.returncode}): "
                                     f"{self.log.read_text()[-2000:] if self.log.exists() else ''}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise AssertionError("the arm64 sshd did not listen within 120 s")
            time.sleep(0.2)

    @property
    def url(self) -> str:
        return f"ssh://root@127.0.0.1:{self.port}"

    @property
    def ssh_args(self) -> str:
        return f"-F {self.home}/ssh_config"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=20)
        # Connection children (sshd -> shell -> python) die with their connections; the
        # listener's own files go with it.
        shutil.rmtree(self.conf, ignore_errors=True)


@pytest.fixture(scope="session")
def arm64_target(arm64_root, tmp_path_factory):
    """A running arm64 sshd; ``SLMEDGE_SSH_ARGS`` points the ssh client at its config."""
    if not shutil.which("ssh") or not shutil.which("ssh-keygen"):
        pytest.fail("the OpenSSH client is missing: run tools/setup.sh")
    server = ChrootSshd(arm64_root, tmp_path_factory.mktemp("arm64-ssh"))
    saved = os.environ.get("SLMEDGE_SSH_ARGS")
    os.environ["SLMEDGE_SSH_ARGS"] = server.ssh_args
    yield server
    if saved is None:
        os.environ.pop("SLMEDGE_SSH_ARGS", None)
    else:
        os.environ["SLMEDGE_SSH_ARGS"] = saved
    server.stop()


@pytest.fixture(scope="session")
def arm64_python(arm64_root) -> str:
    """The target's runner venv (the one ``--target ssh://root@...`` makes and reuses, same
    marker), made here through chroot when missing; returns its python, as seen inside."""
    from slmedge.runtimes.bench.remote import DEFAULT_SSH_DIR, REMOTE_REQUIREMENTS

    venv = f"/root/{DEFAULT_SSH_DIR}/venv"
    reqs = " ".join(REMOTE_REQUIREMENTS)
    marker = arm64_root / venv.lstrip("/") / ".slmedge-ready"
    if not (marker.is_file() and marker.read_text().strip() == reqs):
        script = (f"python3 -m venv --system-site-packages {venv} && {venv}/bin/python -m pip "
                  "install --disable-pip-version-check -q " + " ".join(f"'{r}'" for r in
                                                                       REMOTE_REQUIREMENTS)
                  + f" && printf '%s\\n' '{reqs}' > {venv}/.slmedge-ready")
        out = subprocess.run(["chroot", str(arm64_root), "/bin/sh", "-c", script],
                             capture_output=True, text=True, timeout=3600)
        if out.returncode != 0:
            pytest.fail(f"making the arm64 venv failed: {out.stderr[-3000:]}")
    return f"{venv}/bin/python"
