"""Import the benchmark scripts of ``tools/bench/`` in tests.

They are repository scripts, not part of the installed package (``slmedge.tools`` leaves
them out of the wheel): run as ``python tools/bench/NAME.py``, they import each other from
their own folder, so the tests put that folder on ``sys.path`` the same way.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "tools" / "bench"


def load_bench_script(name: str):
    """The module ``tools/bench/<name>.py``, imported as a script's sibling would import it."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


def __getattr__(name: str):
    """``from bench_scripts import bench_outside``: the script of that name (PEP 562)."""
    if name.startswith("__") or not (BENCH / f"{name}.py").is_file():
        raise AttributeError(f"no benchmark script tools/bench/{name}.py")
    return load_bench_script(name)
