"""Static QDQ (int8-static / a16w8) peak RSS and wall: ORT's whole-graph calibrator vs the
layer-by-layer calibration (exporter/quantize/qdq_layered.py), issue 15.

Each row is one child process (``--child``) running ``quantize_model`` on an fp32 artifact
exported with ``--no-fuse``; the modes alternate within one run (the machine is shared: wall
times are inflated, the load average is recorded per row). Peak RSS is the child's own
(``os.wait4``'s ru_maxrss, tools/bench/bench_scale.run_measured, which also kills it past
``--cap-gb``). The child reports the QDQ file's sha256, so the two modes' files can be
compared byte for byte.

Mode ``writer`` is ``layered`` with the QDQ graph written one segment at a time
(exporter/quantize/qdq_writer.py) instead of ``quantize_static`` on the whole graph; its file
is not ORT's byte for byte (node order), so each row also records ``qdq_graph_sha256``, a
digest of the node multiset and the initializer values computed by the parent after the child
ends (outside the measured RSS): equal digests are the same graph.

Mode ``prefix`` is ``layered`` with each layer's ranges calibrated through the earlier layers
already QDQ'd (``calibration.prefix: quantized``). ``--quality N`` keeps each row's QDQ
artifact and scores it after the child ends (outside the measured RSS) against the fp32
artifact: perplexity, KL and top-1 agreement on the first N tokens of the evaluation
(tuning) text and of the held-out text (``bench_quant.heldout_quality``).

    .venv/bin/python tools/bench/bench_qdq_layered.py --artifact /tmp/smol-fp32 \\
        --name smollm2-135m --scheme int8-static [--modes layered,prefix --quality 4096]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import run_measured  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "qdq_layered.json"
MODES = ("whole", "layered", "prefix", "writer")


def child(artifact: Path, scheme: str, mode: str, keep: Path | None = None) -> dict:
    from slmedge.exporter.quantize import qdq
    from slmedge.exporter.quantize.core import copy_support_files, quantize_model
    from slmedge.exporter.quantize.recipe import QuantRecipe

    qdq.QDQ_LAYERED = mode != "whole"
    recipe = QuantRecipe(scheme=scheme, calibration={
        "prefix": "quantized" if mode == "prefix" else "float",
        # the modes other than writer keep ORT's whole-graph writer (the figures they compare)
        "writer": "segments" if mode == "writer" else "whole"})
    with tempfile.TemporaryDirectory(prefix="bench-qdq-") as tmp:
        dst = Path(tmp) / "model.onnx"
        t0 = time.perf_counter()
        report = quantize_model(artifact / "model.onnx", dst, recipe,
                                tokenizer_dir=artifact, say=lambda m: print(m, file=sys.stderr))
        wall = time.perf_counter() - t0
        digest = hashlib.sha256()
        for p in sorted(Path(tmp).iterdir()):
            digest.update(p.read_bytes())
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            for p in Path(tmp).iterdir():
                p.replace(keep / p.name)
            copy_support_files(artifact, keep, skip={"model.onnx", "model.onnx.data",
                                                     "manifest.json"})
    return {"quantize_s": round(wall, 1), "samples": report.calibration["samples"],
            "label": report.label, "qdq_sha256": digest.hexdigest()}


def graph_digest(path: Path) -> str:
    """sha256 of a QDQ graph as a node multiset and initializer values (order free)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    digest = hashlib.sha256()
    for blob in sorted(n.SerializeToString() for n in model.graph.node):
        digest.update(blob)
    for t in sorted(model.graph.initializer, key=lambda t: t.name):
        digest.update(t.name.encode())
        digest.update(numpy_helper.to_array(t).tobytes())
    return digest.hexdigest()


def scores(artifact: Path, fp32: Path, eval_tokens: int) -> dict:
    """The row's quality: tuning (evaluation) text and held-out text, no greedy prompts."""
    from bench_quant import HELDOUT_TEXT, heldout_quality

    from slmedge.exporter.quality.card import QualitySettings, artifact_card

    card = artifact_card(artifact / "model.onnx", fp32,
                         QualitySettings(eval_tokens=eval_tokens, prompts=()),
                         reference_model=fp32 / "model.onnx", threads=2)
    return {"eval_tokens": eval_tokens, "perplexity": round(card.perplexity, 3),
            "reference_perplexity": round(card.reference_perplexity, 3),
            "ppl_increase_pct": round(card.ppl_increase_pct, 2),
            "kl_mean": round(card.kl_mean, 4), "top1_agreement": round(card.top1_agreement_eval, 4),
            **heldout_quality(artifact / "model.onnx", fp32 / "model.onnx", fp32, HELDOUT_TEXT,
                              eval_tokens)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, required=True, help="fp32 --no-fuse artifact dir")
    ap.add_argument("--name", required=True, help="row label (model)")
    ap.add_argument("--scheme", default="int8-static", choices=["int8-static", "a16w8"])
    ap.add_argument("--modes", default="whole,layered", help=f"order of the rows ({', '.join(MODES)})")
    ap.add_argument("--cap-gb", type=float, default=12.0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--quality", type=int, metavar="N", default=0,
                    help="score each row on N tokens of the tuning and held-out texts")
    ap.add_argument("--run", help="label of this run: rows replace only rows of the same label")
    ap.add_argument("--lock", type=Path, help="run each child under `flock LOCK` (the shared "
                    "machine's big-memory lock): held for the quantization only, not the scoring; "
                    "wall_s then includes the wait, quantize_s does not")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--keep", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.artifact, args.scheme, args.child, args.keep)))
        return 0
    for mode in args.modes.split(","):
        if mode not in MODES:
            ap.error(f"--modes: {mode!r} is not one of {', '.join(MODES)}")
        log = Path(tempfile.gettempdir()) / f"bench_qdq_{args.name}_{args.scheme}_{mode}.log"
        keep = Path(tempfile.mkdtemp(prefix=f"bench-qdq-{mode}-")) / "artifact"
        load = [round(x, 2) for x in os.getloadavg()]
        res = run_measured([*(["flock", str(args.lock)] if args.lock else []),
                            sys.executable, __file__, "--artifact", str(args.artifact),
                            "--name", args.name, "--scheme", args.scheme, "--child", mode,
                            *(["--keep", str(keep)] if keep else [])],
                           log, cap_gb=args.cap_gb)
        lines = log.read_text().strip().splitlines()
        try:
            out = json.loads(lines[-1]) if lines else {}
        except json.JSONDecodeError:
            out = {}
        row = {"model": args.name, "scheme": args.scheme, "calibration": mode,
               **({"run": args.run} if args.run else {}),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **res, **out,
               "loadavg_start": load, "loadavg_end": [round(x, 2) for x in os.getloadavg()],
               "model_bytes": sum(p.stat().st_size for p in args.artifact.glob("model.onnx*"))}
        if res["exit_code"] == 0:
            row["qdq_graph_sha256"] = graph_digest(keep / "model.onnx")
            if args.quality:
                row.update(scores(keep, args.artifact, args.quality))
        shutil.rmtree(keep.parent)
        print(json.dumps(row), file=sys.stderr)
        # read again before writing: another run of this script may have added rows since
        rows = json.loads(args.out.read_text()) if args.out.is_file() else []
        rows = [r for r in rows if (r["model"], r["scheme"], r["calibration"], r.get("run"))
                != (row["model"], row["scheme"], row["calibration"], row.get("run"))] + [row]
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
