"""Static QDQ (int8-static / a16w8) peak RSS and wall: ORT's whole-graph calibrator vs the
layer-by-layer calibration (exporter/quantize/qdq_layered.py), issue 15.

Each row is one child process (``--child``) running ``quantize_model`` on an fp32 artifact
exported with ``--no-fuse``; the modes alternate within one run (the machine is shared: wall
times are inflated, the load average is recorded per row). Peak RSS is the child's own
(``os.wait4``'s ru_maxrss, tools/bench/bench_scale.run_measured, which also kills it past
``--cap-gb``). The child reports the QDQ file's sha256, so the two modes' files can be
compared byte for byte.

    .venv/bin/python tools/bench/bench_qdq_layered.py --artifact /tmp/smol-fp32 \\
        --name smollm2-135m --scheme int8-static
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import run_measured  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "qdq_layered.json"


def child(artifact: Path, scheme: str, layered: bool) -> dict:
    from slmedge.exporter.quantize import qdq
    from slmedge.exporter.quantize.core import quantize_model
    from slmedge.exporter.quantize.recipe import QuantRecipe

    qdq.QDQ_LAYERED = layered
    with tempfile.TemporaryDirectory(prefix="bench-qdq-") as tmp:
        dst = Path(tmp) / "model.onnx"
        t0 = time.perf_counter()
        report = quantize_model(artifact / "model.onnx", dst, QuantRecipe(scheme=scheme),
                                tokenizer_dir=artifact, say=lambda m: print(m, file=sys.stderr))
        wall = time.perf_counter() - t0
        digest = hashlib.sha256()
        for p in sorted(Path(tmp).iterdir()):
            digest.update(p.read_bytes())
    return {"quantize_s": round(wall, 1), "samples": report.calibration["samples"],
            "qdq_sha256": digest.hexdigest()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, required=True, help="fp32 --no-fuse artifact dir")
    ap.add_argument("--name", required=True, help="row label (model)")
    ap.add_argument("--scheme", default="int8-static", choices=["int8-static", "a16w8"])
    ap.add_argument("--modes", default="whole,layered", help="order of the rows")
    ap.add_argument("--cap-gb", type=float, default=12.0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--child", choices=["whole", "layered"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.artifact, args.scheme, args.child == "layered")))
        return 0
    for mode in args.modes.split(","):
        log = Path(tempfile.gettempdir()) / f"bench_qdq_{args.name}_{args.scheme}_{mode}.log"
        load = [round(x, 2) for x in os.getloadavg()]
        res = run_measured([sys.executable, __file__, "--artifact", str(args.artifact),
                            "--name", args.name, "--scheme", args.scheme, "--child", mode],
                           log, cap_gb=args.cap_gb)
        lines = log.read_text().strip().splitlines()
        try:
            out = json.loads(lines[-1]) if lines else {}
        except json.JSONDecodeError:
            out = {}
        row = {"model": args.name, "scheme": args.scheme, "calibration": mode, **res, **out,
               "loadavg_start": load, "loadavg_end": [round(x, 2) for x in os.getloadavg()],
               "model_bytes": sum(p.stat().st_size for p in args.artifact.glob("model.onnx*"))}
        print(json.dumps(row), file=sys.stderr)
        # read again before writing: another run of this script may have added rows since
        rows = json.loads(args.out.read_text()) if args.out.is_file() else []
        rows = [r for r in rows if (r["model"], r["scheme"], r["calibration"])
                != (row["model"], row["scheme"], row["calibration"])] + [row]
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
