"""Write an output directory atomically: build it beside the target, rename it in at the end.

On any failure (including Ctrl-C and SIGTERM) the staging directory is removed and an
existing output is left as it was, so a failed run never leaves a half-written artifact.
SIGKILL (the OOM killer) cannot be caught: the next run writing to the same output removes
the staging directories left by processes that are no longer running (an int4 export of a
3.6B model killed by the OOM killer left a 14 GB hidden ``.partial`` directory; two such
runs filled the disk).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import psutil

from slmedge.runtimes.errors import UsageError

Notice = Callable[[str], None]


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived while a staging directory was open; raised in the main thread so that
    the cleanup runs (a KeyboardInterrupt: the CLI reports "interrupted")."""


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse a non-empty output directory unless ``overwrite`` (before any work is done)."""
    if output.exists() and not output.is_dir():
        raise UsageError(f"output '{output}' exists and is a file; pass a directory path")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise UsageError(
            f"output directory '{output}' exists and is not empty; pass --overwrite to replace "
            "it, or choose another --output"
        )


def _owner_running(pid: int, path: Path) -> bool:
    """Whether process ``pid`` is running and is the one that wrote ``path``: a process that
    started after the directory was last modified only reuses the PID."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        started = proc.create_time()
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # someone else's live process: leave its directory alone
        return True
    try:
        modified = path.stat().st_mtime
    except OSError:
        return False
    return started <= modified + 1.0  # create_time is rounded to the clock tick


def remove_stale_stages(output: Path, notice: Notice = _stderr) -> list[Path]:
    """Remove ``.NAME.partial-PID`` and ``.NAME.old-PID`` beside ``output`` whose process is
    gone (killed, or its PID now belongs to a newer process); returns what was removed."""
    output = Path(output).absolute()
    pattern = re.compile(rf"\.{re.escape(output.name)}\.(partial|old)-(\d+)")
    removed = []
    if not output.parent.is_dir():
        return removed
    for entry in sorted(output.parent.iterdir()):
        match = pattern.fullmatch(entry.name)
        if match is None or not entry.is_dir() or entry.is_symlink():
            continue
        pid = int(match.group(2))
        if pid == os.getpid() or _owner_running(pid, entry):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
        notice(f"removed {entry}: a staging directory left by process {pid}, which is no longer "
               "running (an interrupted or killed run)")
    return removed


@contextmanager
def _raise_on_signals():
    """While open, SIGTERM raises :class:`Terminated` and SIGINT ``KeyboardInterrupt`` in the
    main thread (so ``except``/``finally`` blocks run); the previous handlers come back at the
    end, and a SIGTERM whose previous handler was the default then ends the process as
    SIGTERM does. Signals ignored before (``nohup``, ``&``) stay ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handler(signum, _frame):
        received.append(signum)
        if len(received) > 1:  # already unwinding: let the cleanup finish
            return
        if signum == signal.SIGTERM:
            raise Terminated("terminated (SIGTERM)")
        raise KeyboardInterrupt

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        old = signal.getsignal(sig)
        if old is signal.SIG_IGN or old is None:
            continue
        previous[sig] = old
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        if signal.SIGTERM in received and previous.get(signal.SIGTERM) is signal.SIG_DFL:
            os.kill(os.getpid(), signal.SIGTERM)


@contextmanager
def staged_directory(output: Path, overwrite: bool = False, notice: Notice = _stderr):
    """Yield a fresh staging directory that replaces ``output`` when the block succeeds.

    Stale staging directories of earlier runs to the same output are removed first, with a
    ``notice`` (default: a line on stderr)."""
    output = Path(output).absolute()
    check_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_stages(output, notice)
    stage = output.parent / f".{output.name}.partial-{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)
    with _raise_on_signals():
        stage.mkdir()
        try:
            yield stage
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
    old = None
    if output.exists():
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        os.replace(output, old)
    os.replace(stage, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
