"""A target without an index: ``?wheels=host`` downloads the runner's aarch64 wheels on this
x86 machine and the emulated arm64 target installs them with ``pip --no-index`` (issue 18:
"fetched on the host when the target has no index access")."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from slmedge.runtimes.errors import UsageError
from slmedge.runtimes.bench.remote import WHEELS_DIR, parse_target
from slmedge.tools.cli.app import main


def test_wheels_option_is_checked():
    assert parse_target("ssh://pi@h?wheels=host").wheels == "host"
    assert parse_target("ssh://pi@h").wheels == "target"
    with pytest.raises(UsageError, match="wheels must be 'target'.*or 'host'.*got 'pypi'"):
        parse_target("ssh://pi@h?wheels=pypi")
    with pytest.raises(UsageError, match="wheels=host installs into the runner's venv; it needs "
                                         "venv=1"):
        parse_target("ssh://pi@h?wheels=host&venv=0")


def test_bench_with_host_wheels_on_arm64(arm64_target, arm64_root, tiny_artifact, tmp_path,
                                         capsys, monkeypatch):
    name = f"host-wheels-{os.getpid()}"
    remote = arm64_root / "root" / name  # the target's ~/NAME, seen from the host
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # a fresh download here
    try:
        code = main(["bench", str(tiny_artifact("llama")), "--target",
                     f"{arm64_target.url}/~/{name}?wheels=host", "--json", "--prompt-tokens", "8",
                     "--new-tokens", "2", "--warmup", "0", "--repeats", "1", "--prompt-buckets",
                     "8", "--depths", "8", "--threads", "1", "--no-record", "--no-store"])
        out = capsys.readouterr()
        assert code == 0, out.err
        result = json.loads(out.out)
        assert result["environment"]["arch"] == "aarch64"
        # the wheels the target installed are the aarch64 ones downloaded on this machine...
        downloaded = sorted(p.name for p in (tmp_path / "cache" / "slmedge" / "wheels").rglob(
            "*.whl"))
        copied = sorted(p.name for p in (remote / WHEELS_DIR).glob("*.whl"))
        assert copied == downloaded
        ort = [w for w in copied if w.startswith("onnxruntime-")]
        assert len(ort) == 1 and "aarch64" in ort[0], copied
        # ...and that onnxruntime is the venv's own (not a system one)
        version = ort[0].split("-")[1]
        site = list((remote / "venv").glob("lib/python*/site-packages"))
        assert site and (site[0] / f"onnxruntime-{version}.dist-info").is_dir()
    finally:
        shutil.rmtree(remote, ignore_errors=True)
