"""The QDQ write alone (issue 15): ORT's ``quantize_static`` on the whole graph vs the segment
writer (exporter/quantize/qdq_writer.py), each given the same prepared graph and the same
layered MinMax ranges, each a child process measured on its own (peak RSS: os.wait4's
ru_maxrss via bench_scale.run_measured). bench_qdq_layered.py measures the whole quantize run,
whose peak may be another phase's (prepare, calibration reader); this isolates the writing.

A first child (``ranges``) prepares the graph as ``quantize_model`` does and calibrates it
layer by layer, writing ``prepared.onnx`` and the ranges to ``--workdir``; then the ``ort``
and ``writer`` children alternate (``--rounds``). The parent compares the two outputs as a
node multiset and initializer values (``qdq_writer.same_graph``) after the children end.

    .venv/bin/python tools/bench/bench_qdq_write.py --artifact /tmp/qwen-fp32 \\
        --name qwen2.5-0.5b-random --scheme int8-static --workdir /tmp/h3/w --lock /tmp/coord/bigmem.lock
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import run_measured  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "qdq_write.json"


def _plan(prepared: Path, recipe):
    import onnx

    from slmedge.exporter.quantize import qdq
    from slmedge.exporter.quantize.core import _a16w8_kept_float
    from slmedge.exporter.quantize.graph import analyze
    from slmedge.exporter.quantize.recipe import QuantScheme

    model = onnx.load(str(prepared), load_external_data=False)
    facts = analyze(model)
    keep = _a16w8_kept_float(model, facts) if recipe.scheme is QuantScheme.a16w8 else None
    nodes, table = qdq.plan_static(model, facts, recipe, keep)
    return facts, keep, nodes, sorted({op for op, row in table.items() if row["quantized"]})


def child(mode: str, artifact: Path, work: Path, scheme: str) -> dict:
    import onnx

    from slmedge.exporter.quantize import qdq
    from slmedge.exporter.quantize.calibration import KVCacheCalibrationReader
    from slmedge.exporter.quantize.core import (
        _tokens_for_calibration, fold_weight_transposes, save_model, split_gemms)
    from slmedge.exporter.quantize.recipe import QuantRecipe

    # ort: quantize_static on the whole graph; writer: one segment at a time (the default)
    recipe = QuantRecipe(scheme=scheme,
                         calibration={"writer": "whole" if mode == "ort" else "segments"})
    prepared, ranges = work / "prepared.onnx", work / f"{scheme}.ranges.json"
    t0 = time.perf_counter()
    if mode == "ranges":
        model = onnx.load(str(artifact / "model.onnx"))
        split_gemms(model)
        fold_weight_transposes(model)
        save_model(model, prepared)
        del model
        _, _, nodes, op_types = _plan(prepared, recipe)
        reader = KVCacheCalibrationReader(prepared, _tokens_for_calibration(
            artifact, recipe.calibration, None), recipe.calibration)
        qdq.save_ranges(qdq.calibrate_layered(prepared, reader, recipe, op_types, nodes=nodes),
                        ranges)
    else:
        facts, keep, _, _ = _plan(prepared, recipe)
        dst = work / f"{mode}-{scheme}" / "model.onnx"
        dst.parent.mkdir(exist_ok=True)
        qdq.quantize_static_qdq(prepared, dst, facts, recipe, None, keep_float=keep, ranges=ranges)
    return {"seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, required=True, help="fp32 --no-fuse artifact dir")
    ap.add_argument("--name", required=True)
    ap.add_argument("--scheme", default="int8-static", choices=["int8-static", "a16w8"])
    ap.add_argument("--workdir", type=Path, required=True, help="scratch (prepared graph, outputs; deleted after)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--lock", type=Path)
    ap.add_argument("--cap-gb", type=float, default=14.0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--child", choices=["ranges", "ort", "writer"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.artifact, args.workdir, args.scheme)))
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for mode in ["ranges"] + ["ort", "writer"] * args.rounds:
        log = args.workdir / f"{mode}.log"
        load = [round(x, 2) for x in os.getloadavg()]
        res = run_measured([*(["flock", str(args.lock)] if args.lock else []), sys.executable,
                            __file__, "--artifact", str(args.artifact), "--name", args.name,
                            "--scheme", args.scheme, "--workdir", str(args.workdir),
                            "--child", mode], log, cap_gb=args.cap_gb)
        lines = log.read_text().strip().splitlines()
        out = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
        rows.append({"model": args.name, "scheme": args.scheme, "step": mode,
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **res, **out,
                     "loadavg_start": load, "loadavg_end": [round(x, 2) for x in os.getloadavg()]})
        print(json.dumps(rows[-1]), file=sys.stderr)
        if res["exit_code"] != 0:
            break
    import onnx

    from slmedge.exporter.quantize.qdq_writer import same_graph

    outs = {m: args.workdir / f"{m}-{args.scheme}" / "model.onnx" for m in ("ort", "writer")}
    if all(p.is_file() for p in outs.values()):
        diffs = same_graph(onnx.load(str(outs["ort"])), onnx.load(str(outs["writer"])))
        for row in rows:
            row["same_graph_as_ort"] = not diffs
            row["differences"] = diffs[:5]
    old = json.loads(args.out.read_text()) if args.out.is_file() else []
    old = [r for r in old if (r["model"], r["scheme"]) != (args.name, args.scheme)]
    args.out.write_text(json.dumps(old + rows, indent=1) + "\n")
    shutil.rmtree(args.workdir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
