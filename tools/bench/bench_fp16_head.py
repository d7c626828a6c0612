"""Memory of an fp16 tied lm_head in ONNX Runtime's keep-fp16 verification session (issue 15).

    python tools/bench/bench_fp16_head.py [--vocab 128256 --hidden 3072] [--tokens 1,256]
                                          [--json out.json] [--workdir DIR]

The head alone (embedding Gather + lm_head, random fp16 table with external data), in three
forms, each opened in its own process with ``verification_session_options(keep_fp16=True)``
and run once on ``tokens`` positions: RssAnon / RssFile after load and after the forward, the
process's VmHWM, and whether the logits equal the first form's:

- ``transpose``: the exporter's form, ``MatMul(h, Transpose(W))`` (ONNX Runtime folds the
  Transpose into a second fp16 table and casts the fp32 B it needs on each forward);
- ``once``: :class:`TiedHeadOnce`'s ``[1, K, V]`` table (no Transpose; still one Cast of the
  whole table per forward);
- ``chunks``: :class:`Fp16TiedHeadChunks` (the exporter's fp16 form since 05f1731).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

FORMS = ("transpose", "once", "chunks")


def build(form: str, v: int, k: int, directory: Path) -> Path:
    import onnx
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    from slmedge.exporter.passes.tied_head import Fp16TiedHeadChunks, TiedHeadOnce

    path = directory / form / "head.onnx"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    w = (np.random.default_rng(0).standard_normal((v, k), dtype=np.float32) * 0.02).astype(np.float16)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["w", "ids"], ["emb"]),
         helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
         helper.make_node("MatMul", ["h", "wt"], ["logits"])], "head",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT16, ["b", "s", k])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT16, ["b", "s", v]),
         helper.make_tensor_value_info("emb", TensorProto.FLOAT16, ["b", "s", k])],
        [numpy_helper.from_array(w, "w")])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    if form != "transpose":
        fusion = TiedHeadOnce() if form == "once" else Fp16TiedHeadChunks()
        fusion(model)
        assert fusion.count == 1, fusion.reasons
    ir.save(model, str(path), external_data="head.onnx.data")
    onnx.checker.check_model(str(path))
    return path


def _rss() -> dict:
    status = open("/proc/self/status").read()
    get = lambda key: int(status.split(key + ":")[1].split()[0]) // 1024  # noqa: E731
    return {"anon_mib": get("RssAnon"), "file_mib": get("RssFile"), "hwm_mib": get("VmHWM")}


def measure(path: Path, tokens: int, k: int, v: int, save: Path) -> dict:
    """In this process: open the session, run one forward; the logits go to ``save``."""
    import onnxruntime as ort

    from slmedge.exporter.quality.memory import verification_session_options

    before = _rss()
    session = ort.InferenceSession(str(path), verification_session_options(keep_fp16=True),
                                   providers=["CPUExecutionProvider"])
    loaded = _rss()
    rng = np.random.default_rng(1)
    feeds = {"h": rng.standard_normal((1, tokens, k)).astype(np.float16),
             "ids": rng.integers(0, v, (1, tokens)).astype(np.int64)}
    logits, emb = session.run(None, feeds)
    np.save(save, logits)
    return {"before": before, "after_load": loaded, "after_forward": _rss()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--hidden", type=int, default=3072)
    ap.add_argument("--tokens", default="1,256")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_fp16_head"))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--measure", nargs=2, metavar=("FORM", "TOKENS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    v, k, work = args.vocab, args.hidden, args.workdir / f"{args.vocab}x{args.hidden}"
    if args.measure:  # the child: one form, one forward
        form, tokens = args.measure[0], int(args.measure[1])
        print(json.dumps(measure(work / form / "head.onnx", tokens, k, v,
                                 work / f"logits_{form}_{tokens}.npy")))
        return 0
    rows = []
    for form in FORMS:
        build(form, v, k, work)
    for tokens in (int(t) for t in args.tokens.split(",")):
        for form in FORMS:
            out = subprocess.run([sys.executable, __file__, "--vocab", str(v), "--hidden", str(k),
                                  "--workdir", str(args.workdir), "--measure", form, str(tokens)],
                                 check=True, capture_output=True, text=True).stdout
            row = {"form": form, "tokens": tokens, **json.loads(out.splitlines()[-1]),
                   "loadavg": [round(x, 2) for x in os.getloadavg()]}
            first = np.load(work / f"logits_{FORMS[0]}_{tokens}.npy")
            got = np.load(work / f"logits_{form}_{tokens}.npy")
            row["logits_equal_transpose_form"] = bool(np.array_equal(got, first))
            row["max_abs_diff_vs_transpose_form"] = float(np.abs(got.astype(np.float32) - first).max())
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.json:
        args.json.write_text(json.dumps({"vocab": v, "hidden": k, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
