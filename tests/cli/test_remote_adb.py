"""``--target adb://...``: the adb command lines, checked with a fake ``adb`` on PATH.

The fake records its argv and behaves like adb where it matters: ``adb devices`` lists
what the test says; ``adb push SRC DST`` copies the file to DST taken literally (adb's
sync protocol uses no shell); ``adb shell ARGS...`` joins ARGS with spaces and runs the
line with ``sh -c``, as adbd does on the phone. The "device" is a directory here and its
Python is this interpreter, so the runner really runs and the JSON comes back.

A real phone is not here: the one test that needs it skips unless SLMEDGE_ADB_URL names
a connected device.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from pathlib import Path

import pytest

from slmedge.runtimes.bench.runner import BenchConfig
from slmedge.runtimes.bench.schema import validate_result
from slmedge.runtimes.errors import UsageError
from slmedge.runtimes.bench.remote import RemoteError, parse_target, run_remote_bench

FAST = BenchConfig(prompt_tokens=8, new_tokens=4, warmup=0, repeats=2, prompt_buckets=(8,),
                   decode_depths=(8,), threads=1)

FAKE_ADB = r'''#!{python}
import json, os, shutil, sys
args = sys.argv[1:]
with open(os.environ["FAKE_ADB_LOG"], "a") as log:
    log.write(json.dumps(args) + "\n")
if args[:1] == ["-s"]:
    serial, args = args[1], args[2:]
    if serial not in os.environ["FAKE_ADB_DEVICES"].split(","):
        sys.exit("error: device '%s' not found" % serial)
if args[0] == "devices":
    print("List of devices attached")
    for s in filter(None, os.environ["FAKE_ADB_DEVICES"].split(",")):
        print(s + "\tdevice")
    print(os.environ.get("FAKE_ADB_EXTRA", ""), end="")
elif args[0] == "push":
    src, dst = args[1], args[2]
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copyfile(src, dst)
    print("%s: 1 file pushed" % src)
elif args[0] == "shell":
    os.execvp("sh", ["sh", "-c", " ".join(args[1:])])
else:
    sys.exit("fake adb: unsupported " + repr(args))
'''


@pytest.fixture
def fake_adb(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    adb = bin_dir / "adb"
    adb.write_text(FAKE_ADB.format(python=sys.executable))
    adb.chmod(0o755)
    log = tmp_path / "adb.log"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_ADB_LOG", str(log))
    monkeypatch.setenv("FAKE_ADB_DEVICES", "emulator-5554")
    monkeypatch.delenv("SLMEDGE_ADB", raising=False)

    def calls() -> list[list[str]]:
        return [json.loads(ln) for ln in log.read_text().splitlines()] if log.exists() else []

    return calls


@pytest.fixture(scope="module")
def spaced_artifact(tiny_artifact, tmp_path_factory):
    dst = tmp_path_factory.mktemp("art") / "tiny model"
    shutil.copytree(tiny_artifact("llama"), dst)
    return dst


def _device_url(root: Path, serial: str = "") -> str:
    return f"adb://{serial}{root}?python={sys.executable}"


def test_adb_bench_commands_are_quoted_and_the_json_comes_back(fake_adb, spaced_artifact,
                                                              tmp_path):
    root = tmp_path / "device" / "data local tmp" / "slm edge"  # spaces on the device side
    result = run_remote_bench(_device_url(root), spaced_artifact, FAST)
    r = validate_result(result)
    assert r.status == "complete" and r.target == "adb://emulator-5554"
    assert r.label == "tiny model" and r.environment.executable == sys.executable

    calls = fake_adb()
    assert calls[0] == ["devices"]  # adb:// with no serial: the only device is looked up
    assert all(c[:2] == ["-s", "emulator-5554"] for c in calls[1:])
    pushes = [c[3:] for c in calls[1:] if c[2] == "push"]
    shells = [c[3:] for c in calls[1:] if c[2] == "shell"]
    # every push: a real local file -> a literal device path (no shell quoting)
    assert pushes and all(Path(src).is_file() and len(rest) == 1 for src, *rest in pushes)
    model_push = next(p for p in pushes if p[0].endswith("model.onnx"))
    assert model_push[0] == str(spaced_artifact / "model.onnx")
    assert model_push[1].startswith(f"{root}/artifacts/tiny model-")
    assert model_push[1].endswith(".partial/model.onnx")
    # every shell: one argument, a command line where the paths survive as single words
    assert all(len(s) == 1 for s in shells)
    run_line = next(s[0] for s in shells if "slmedge.runtimes.bench.runner" in s[0])
    words = shlex.split(run_line)
    assert words[:3] == ["cd", str(root), "&&"]
    assert sys.executable in words and "--exit-on-stdin-eof" in words
    assert any(w.startswith("artifacts/tiny model-") for w in words)
    # what landed on the "device"
    art = next((root / "artifacts").iterdir())
    assert (art / ".complete").exists() and (art / "manifest.json").is_file()
    assert not list(root.rglob("*.partial"))
    assert list((root / "results").glob("*.json"))

    # second run, with session options: nothing pushed again; the options reach the runner
    before = len(calls)
    again = run_remote_bench(_device_url(root, "emulator-5554"), spaced_artifact, FAST,
                             providers=[("CPUExecutionProvider", {})], strict=True)
    assert again["environment"]["providers"] == ["CPUExecutionProvider"]
    later = fake_adb()[before:]
    assert not any(c[2:3] == ["push"] for c in later)
    words = shlex.split(next(c[3] for c in later if "slmedge.runtimes.bench.runner" in c[3]))
    assert "--strict" in words
    assert json.loads(words[words.index("--providers-json") + 1]) == [["CPUExecutionProvider", {}]]


def test_a_failure_on_the_device_comes_back_as_the_runners_error(fake_adb, spaced_artifact,
                                                                 tmp_path):
    broken = tmp_path / "broken model"
    shutil.copytree(spaced_artifact, broken)
    model = broken / "model.onnx"
    model.write_bytes(b"\0" * model.stat().st_size)  # same size: only loading it tells
    with pytest.raises(RemoteError, match=r"failed: ONNX Runtime could not load") as err:
        run_remote_bench(_device_url(tmp_path / "device"), broken, FAST)
    assert err.value.exit_code == 1 and err.value.partial is None


def test_adb_device_selection_errors(fake_adb, spaced_artifact, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_ADB_DEVICES", "")
    with pytest.raises(RemoteError, match="no device ready"):
        run_remote_bench(_device_url(tmp_path / "d"), spaced_artifact, FAST)
    monkeypatch.setenv("FAKE_ADB_DEVICES", "A123,B456")
    with pytest.raises(UsageError, match=r"2 devices are connected \(A123 \(device\), B456"):
        run_remote_bench(_device_url(tmp_path / "d"), spaced_artifact, FAST)
    monkeypatch.setenv("FAKE_ADB_DEVICES", "A123")
    monkeypatch.setenv("FAKE_ADB_EXTRA", "C789\tunauthorized\n")  # only A123 is ready: used
    result = run_remote_bench(_device_url(tmp_path / "d"), spaced_artifact, FAST)
    assert result["target"] == "adb://A123"


def test_adb_python_without_onnxruntime_is_explained(fake_adb, spaced_artifact, tmp_path):
    python = shutil.which("python3", path="/usr/bin")
    with pytest.raises(RemoteError, match=r"cannot run the runner.*\?python=/path/to/python"):
        run_remote_bench(f"adb://{tmp_path / 'd'}?python={python}", spaced_artifact, FAST)


def test_target_urls():
    t = parse_target("ssh://pi@raspberrypi.local:2222/home/pi/bench?python=python3.11")
    assert (t.user, t.host, t.port, t.root, t.python, t.venv) == (
        "pi", "raspberrypi.local", 2222, "/home/pi/bench", "python3.11", True)
    t = parse_target("ssh://pi5")
    assert (t.user, t.port, t.root) == (None, None, ".cache/slmedge")
    assert parse_target("ssh://pi5/~/x y").root == "x y"
    t = parse_target("adb://192.168.1.5:5555/sdcard/x%20y")
    assert (t.host, t.root, t.venv) == ("192.168.1.5:5555", "/sdcard/x y", False)
    t = parse_target("adb://")
    assert (t.host, t.root) == ("", "/data/local/tmp/slmedge")
    for bad, why in (("http://x", "unknown scheme"), ("ssh://", "no host"),
                     ("ssh://h?colour=red", "unknown option"), ("ssh://h:port", "port"),
                     ("ssh://h?venv=maybe", "venv must be")):
        with pytest.raises(UsageError, match=why):
            parse_target(bad)


def test_on_a_real_device(spaced_artifact):
    url = os.environ.get("SLMEDGE_ADB_URL")
    if not url or not shutil.which("adb"):
        pytest.skip("needs an Android device whose Python has onnxruntime, numpy and psutil: "
                    "set SLMEDGE_ADB_URL=adb://SERIAL/DIR?python=PATH and put adb on PATH")
    r = validate_result(run_remote_bench(url, spaced_artifact, FAST))
    assert r.status == "complete" and r.environment.android


def test_cli_bench_target_adb_passes_strict_to_the_device(fake_adb, spaced_artifact, tmp_path):
    from slmedge.tools.cli.app import main

    out = tmp_path / "r.json"
    rc = main(["bench", str(spaced_artifact), "--target", _device_url(tmp_path / "dev ice"),
               "--strict", "--prompt-tokens", "8", "--new-tokens", "4", "--warmup", "0",
               "--repeats", "1", "--prompt-buckets", "8", "--depths", "8", "--output", str(out)])
    assert rc == 0
    run_line = next(c[3] for c in reversed(fake_adb()) if c[2:3] == ["shell"]
                    and "slmedge.runtimes.bench.runner" in c[3])
    assert "--strict" in shlex.split(run_line)
    assert validate_result(json.loads(out.read_text())).target == "adb://emulator-5554"
