"""Staged writes: SIGTERM / SIGINT remove the staging directory, and directories left by
killed runs (SIGKILL, the OOM killer) are removed by the next write to the same output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from slmedge.exporter.staging import remove_stale_stages, staged_directory

WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from slmedge.exporter.staging import staged_directory

    with staged_directory(Path(sys.argv[1])) as stage:
        (stage / "model.onnx").write_bytes(b"x" * 1000)
        print(stage, flush=True)
        time.sleep(120)
    print("finished", flush=True)
""")


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def start_writer(out: Path) -> tuple[subprocess.Popen, Path]:
    # SIGINT at its default in the child, whatever this pytest inherited: a shell starts a
    # background job with SIGINT ignored, and staging (rightly) leaves an ignored SIGINT alone
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(out)], stdout=subprocess.PIPE,
                            text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    stage = Path(proc.stdout.readline().strip())  # the stage exists and holds a file
    assert stage.name == f".{out.name}.partial-{proc.pid}" and (stage / "model.onnx").is_file()
    return proc, stage


@pytest.mark.parametrize("sig, returncode", [(signal.SIGTERM, -signal.SIGTERM),
                                             (signal.SIGINT, -signal.SIGINT)])
def test_a_signal_during_a_staged_write_removes_the_stage(tmp_path, sig, returncode):
    out = tmp_path / "art"
    proc, stage = start_writer(out)
    proc.send_signal(sig)
    rest, _ = proc.communicate(timeout=60)
    # SIGTERM ends the process as SIGTERM does (after the cleanup); SIGINT is Python's
    # KeyboardInterrupt, uncaught in this script (Python then ends by SIGINT)
    assert proc.returncode == returncode
    assert "finished" not in rest
    assert not stage.exists() and not out.exists()
    assert leftovers(tmp_path, "art") == []


def test_signal_handlers_are_restored_after_the_stage(tmp_path):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with staged_directory(tmp_path / "a") as stage:
        assert signal.getsignal(signal.SIGTERM) not in (before[0], signal.SIG_DFL)
        (stage / "f").write_text("ok")
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert (tmp_path / "a" / "f").read_text() == "ok"
    with pytest.raises(RuntimeError), staged_directory(tmp_path / "b"):
        raise RuntimeError("boom")
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert leftovers(tmp_path, "b") == [] and not (tmp_path / "b").exists()


def test_sigterm_during_a_real_export_leaves_nothing(tmp_path, tiny_dir):
    """``slmedge export`` in a subprocess, SIGTERM as soon as its staging directory exists."""
    model = tiny_dir("llama")
    out = tmp_path / "art"
    proc = subprocess.Popen([sys.executable, "-m", "slmedge.tools.cli", "export", "--model",
                             str(model), "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stage = tmp_path / f".art.partial-{proc.pid}"
    while not stage.exists() and proc.poll() is None:
        time.sleep(0.01)
    assert stage.exists(), f"the export ended before its stage was seen: {proc.stderr.read()}"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGTERM, err
    assert not out.exists()
    assert leftovers(tmp_path, "art") == []


def test_the_next_export_removes_stale_stages_of_dead_processes(capsys, tmp_path, tiny_dir):
    from slmedge.tools.cli.app import main

    pid = dead_pid()
    for kind in ("partial", "old"):
        stale = tmp_path / f".art.{kind}-{pid}"
        stale.mkdir()
        (stale / "model.onnx.data").write_bytes(b"\0" * 4096)
    code = main(["export", "--model", str(tiny_dir("llama")), "--output", str(tmp_path / "art")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert leftovers(tmp_path, "art") == []
    assert (tmp_path / "art" / "manifest.json").is_file()
    for kind in ("partial", "old"):
        assert f".art.{kind}-{pid}" in err and "no longer running" in err


def test_stale_stages_of_a_running_writer_or_another_output_are_kept(tmp_path):
    notices: list[str] = []
    parent = os.getppid()  # running, and started before these directories were made
    kept = [tmp_path / f".art.partial-{parent}", tmp_path / f".other.partial-{dead_pid()}",
            tmp_path / f".art.partial-{dead_pid()}x"]
    for d in kept:
        d.mkdir()
    (tmp_path / f".art.old-{dead_pid()}").write_text("a file, not a staging directory")
    assert remove_stale_stages(tmp_path / "art", notices.append) == []
    assert notices == [] and all(d.is_dir() for d in kept)


def test_a_reused_pid_does_not_keep_a_stale_stage(tmp_path):
    """The PID belongs to a process that started after the directory was last written: the
    writer is gone and the PID was reused."""
    notices: list[str] = []
    stale = tmp_path / f".art.partial-{os.getppid()}"
    stale.mkdir()
    os.utime(stale, (946684800, 946684800))  # 2000-01-01
    assert remove_stale_stages(tmp_path / "art", notices.append) == [stale]
    assert not stale.exists() and len(notices) == 1 and str(stale) in notices[0]
