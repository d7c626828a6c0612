"""HQQ speed (issue 15): ``exporter/quantize/hqq.py`` now vs a baseline revision of it, per
matrix, the two alternating, with the bytes compared.

    python tools/bench/bench_hqq.py [--baseline-rev 74164ee] [--rounds 2] \
        [--shapes 2048x8192 4096x14336 896x4864] [--json tools/bench/results/hqq_speed.json] \
        [--attach quantize_step=runs.jsonl]

Each shape is a ``[K, N]`` MatMul weight (K the input features), float32 N(0, 0.02) with a
fixed seed, quantized to int4 at block 32 by both versions in turn, ``--rounds`` times; the
baseline's source comes from ``git show REV:exporter/quantize/hqq.py``. Recorded per call:
wall seconds and the process's CPU seconds (``time.process_time``: less sensitive to other
processes on this shared machine than wall time, which grows with the load), and the load
average before and after. ``same_bytes`` compares packed weights, scales and zero points.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
SOURCE = "exporter/quantize/hqq.py"


def _baseline(rev: str):
    text = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{SOURCE}"], check=True,
                          capture_output=True, text=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(text)
    spec = importlib.util.spec_from_file_location("hqq_baseline", f.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    os.unlink(f.name)
    return module


def _timed(fn, w):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(w, 4, 32)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline-rev", default="74164ee",
                    help="git revision of hqq.py to compare with (default: before issue 15)")
    ap.add_argument("--shapes", nargs="+", default=["2048x8192", "4096x14336", "896x4864"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--attach", nargs="*", default=[], metavar="KEY=FILE",
                    help="JSON documents measured elsewhere (e.g. the export's quantize step with "
                    "each version) to include under KEY")
    args = ap.parse_args(argv)

    from slmedge.exporter.quantize import hqq

    git = ["git", "-C", str(REPO)]
    rev = subprocess.run([*git, "log", "-1", "--format=%h", "--", SOURCE], capture_output=True,
                         text=True).stdout.strip()  # the last commit of hqq.py itself
    if subprocess.run([*git, "diff", "--quiet", "HEAD", "--", SOURCE]).returncode:
        rev += "+uncommitted"
    tools = {"baseline": _baseline(args.baseline_rev).hqq_quantize, "current": hqq.hqq_quantize}
    rows = []
    for shape in args.shapes:
        k, n = (int(v) for v in shape.split("x"))
        w = (np.random.default_rng(0).standard_normal((k, n)) * 0.02).astype(np.float32)
        row = {"shape_kn": [k, n], "block": 32, "bits": 4, "load_before": os.getloadavg()}
        outs = {}
        for _ in range(args.rounds):
            for name, fn in tools.items():
                outs[name], wall, cpu = _timed(fn, w)
                row.setdefault(name, []).append({"wall_s": round(wall, 3), "cpu_s": round(cpu, 3)})
                print(f"{shape} {name}: wall {wall:.2f} s, cpu {cpu:.2f} s", file=sys.stderr)
        row["load_after"] = os.getloadavg()
        row["same_bytes"] = all(a.dtype == b.dtype and a.tobytes() == b.tobytes()
                                for a, b in zip(outs["baseline"], outs["current"], strict=True))
        for unit in ("wall_s", "cpu_s"):
            base = statistics.median(r[unit] for r in row["baseline"])
            cur = statistics.median(r[unit] for r in row["current"])
            row[f"speedup_{unit[:-2]}"] = round(base / cur, 2)
        rows.append(row)
        del w, outs
    doc = {"what": "hqq_quantize per matrix: baseline revision vs current, alternating",
           "baseline_rev": args.baseline_rev, "current_rev": rev, "cpu_count": os.cpu_count(),
           "note": "shared machine: wall times grow with the load average recorded per shape; "
                   "cpu_s is this process's CPU time", "matrices": rows}
    for spec in args.attach:
        key, _, path = spec.partition("=")
        doc[key] = [json.loads(line) for line in Path(path).read_text().splitlines() if line]
    text = json.dumps(doc, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0 if all(r["same_bytes"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
