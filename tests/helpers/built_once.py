"""One build per test run, shared by pytest-xdist's workers (a file lock in the run's base
directory)."""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path


def built_once(tmp_path_factory, name: str, build) -> Path:
    """``build(out)`` run once for the whole test run, even across pytest-xdist workers: the
    first worker to ask builds under the run's shared base directory while holding a file lock;
    the others wait for it and reuse the result (each worker otherwise exports its own copy of
    an expensive artifact: SmolLM2 fp32 is ~1.5 min of both cores). Callers must not modify the
    result. Without xdist the base directory is the session's own."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # pytest-of-<user>/pytest-N/, shared by the run's workers
    out, done = base / name, base / f"{name}.done"
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            if out.exists():  # a worker that failed half-way: build again from nothing
                shutil.rmtree(out)
            build(out)
            done.touch()
    return out
