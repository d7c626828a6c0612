"""Load peak and RSS after load of an int4 artifact's zero-point correction storages (issue 16).

    python tools/bench/bench_zero_point_load.py --artifact f16=/tmp/smollm2-int4 \\
        [--artifact u12=/tmp/smollm2-int4-u12] [--fp32-twin DIR] [--int8-twin 4=DIR] \\
        [--twins-only] --rounds 3 \\
        --json tools/bench/results/bench_zero_point_load.json

``--fp32-twin`` adds, for the first artifact, a copy whose compact corrections (fp16 ``M`` or
codes) are put back as fp32 ``M`` initializers (``materialize_corrections``: what ONNX
Runtime's constant folding makes of them at load; the ``float32`` storage's graph, the same
numbers): the two then differ only in how ``M`` is stored.

Each measurement is a fresh Python process (the artifacts alternating, round after round)
that loads ``model.onnx`` one of two ways and reads its own ``VmRSS`` / ``VmHWM`` from
``/proc/self/status`` (the OS's figures: not affected by the machine's load):

- ``plain``: ``onnxruntime.InferenceSession`` with 2 intra-op threads and nothing else;
  then ``malloc_trim(0)`` and the RSS again;
- ``runtime``: slmedge's ``OnnxDecoder`` (which trims the heap itself after load).

Seconds are wall time on a shared machine (the load average is recorded per round).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

_CHILD = r"""
import ctypes, json, sys, time
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
how, path = sys.argv[1], sys.argv[2]
before = status("VmRSS")
t = time.perf_counter()
if how == "plain":
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
else:
    from slmedge.runtimes.sessions.onnx_decoder import OnnxDecoder
    sess = OnnxDecoder(path, threads=2)
seconds = time.perf_counter() - t
row = {"load_s": round(seconds, 2), "rss_before_mb": round(before, 1),
       "rss_after_load_mb": round(status("VmRSS"), 1), "peak_mb": round(status("VmHWM"), 1)}
if how == "plain":
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    row["rss_after_trim_mb"] = round(status("VmRSS"), 1)
print(json.dumps(row))
"""


def model_mb(art: Path) -> float:
    return round(sum(p.stat().st_size for p in art.glob("model.onnx*")) / 1e6, 2)


def fp32_twin(art: Path, out: Path) -> Path:
    """``art`` with its compact corrections materialized as fp32 ``M`` (model files only)."""
    from slmedge.exporter.quantize.fold_zero_points import materialize_corrections

    return _twin(art, out, materialize_corrections, "fp32 twin: materialized",
                 "no compact zero-point correction to materialize (fp32 M already, or nothing "
                 "folded); pass an fp16 / uint12 artifact")


def int8_twin(art: Path, out: Path, level: int) -> Path:
    """``art`` with its corrections applied by 8-bit MatMulNBits of accuracy ``level``
    (``corrections_as_int8``: ``M`` as stored, rounded to int8: the ``int8`` / ``int8-a8``
    storages' graph without quantizing again)."""
    from slmedge.exporter.quantize.fold_zero_points import corrections_as_int8

    return _twin(art, out, lambda m: corrections_as_int8(m, level),
                 f"int8 twin (level {level}): rewritten", "no folded correction to rewrite")


def _twin(art: Path, out: Path, rewrite, done_msg: str, none_msg: str) -> Path:
    import onnx

    out.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(art / "model.onnx"))
    done = rewrite(model)
    if not done:
        raise SystemExit(f"{art}: {none_msg}")
    external = any(True for _ in art.glob("model.onnx.data"))
    for old in out.glob("model.onnx*"):
        old.unlink()
    onnx.save_model(model, str(out / "model.onnx"), save_as_external_data=external,
                    all_tensors_to_one_file=True, location="model.onnx.data",
                    size_threshold=1024)
    for p in art.iterdir():  # tokenizer, config: OnnxDecoder reads only the graph, but keep
        if not p.name.startswith("model.onnx") and p.is_file():
            shutil.copy2(p, out / p.name)
    _restamp(out)
    print(f"{done_msg} {done} corrections -> {out}", file=sys.stderr)
    return out


def _restamp(art: Path) -> None:
    """The twin's manifest records its own model files (the runtime checks size and hash)."""
    import hashlib

    path = art / "manifest.json"
    if not path.exists():
        return
    manifest = json.loads(path.read_text())
    for name, meta in manifest.get("files", {}).items():
        if name.startswith("model.onnx") and (art / name).exists():
            meta["size"] = (art / name).stat().st_size
            meta["sha256"] = hashlib.sha256((art / name).read_bytes()).hexdigest()
    path.write_text(json.dumps(manifest, indent=2) + "\n")


def measure(how: str, art: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", _CHILD, how, str(art / "model.onnx")],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact", action="append", required=True, help="NAME=DIR")
    p.add_argument("--fp32-twin", type=Path, metavar="DIR",
                   help="build the first artifact's fp32-M twin here and measure it too")
    p.add_argument("--int8-twin", action="append", default=[], metavar="LEVEL=DIR",
                   help="build the first artifact's twin with its corrections as 8-bit "
                   "MatMulNBits of accuracy LEVEL (1 or 4) in DIR, and measure it too")
    p.add_argument("--twins-only", action="store_true", help="build the twins, measure nothing")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    arts = {k: Path(v) for k, v in (a.split("=", 1) for a in args.artifact)}
    first = next(iter(arts.values()))
    for spec in args.int8_twin:
        level, where = spec.split("=", 1)
        arts[f"int8-l{level}-twin"] = int8_twin(first, Path(where), int(level))
    if args.fp32_twin:
        arts["f32-twin"] = fp32_twin(first, args.fp32_twin)
    if args.twins_only:
        return
    runs = {name: {"plain": [], "runtime": []} for name in arts}
    loads = []
    for r in range(args.rounds):
        loads.append([round(x, 2) for x in os.getloadavg()])
        for how in ("plain", "runtime"):
            for name, art in arts.items():
                row = measure(how, art)
                runs[name][how].append(row)
                print(f"round {r + 1} {how:7s} {name:10s} {row}", file=sys.stderr)
    out = {"what": "issue 16: load peak / RSS after load per zero-point correction storage, "
                   "each a fresh process, alternating (tools/bench/bench_zero_point_load.py)",
           "load_average_per_round": loads, "artifacts": {}}
    for name, art in arts.items():
        summary = {"model_mb": model_mb(art), "path": str(art)}
        for how, rows in runs[name].items():
            for key in rows[0]:
                summary[f"{how}_{key}_median"] = round(statistics.median(x[key] for x in rows), 2)
        out["artifacts"][name] = {"summary": summary, "runs": runs[name]}
    text = json.dumps(out, indent=1)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
