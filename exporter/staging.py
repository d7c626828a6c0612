"""Write an output directory atomically: build it beside the target, rename it in at the end.

On any failure (including Ctrl-C) the staging directory is removed and an existing
output is left as it was, so a failed run never leaves a half-written artifact.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from slmedge.runtimes.errors import UsageError


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse a non-empty output directory unless ``overwrite`` (before any work is done)."""
    if output.exists() and not output.is_dir():
        raise UsageError(f"output '{output}' exists and is a file; pass a directory path")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise UsageError(
            f"output directory '{output}' exists and is not empty; pass --overwrite to replace "
            "it, or choose another --output"
        )


@contextmanager
def staged_directory(output: Path, overwrite: bool = False):
    """Yield a fresh staging directory that replaces ``output`` when the block succeeds."""
    output = Path(output).absolute()
    check_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    stage = output.parent / f".{output.name}.partial-{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)
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
