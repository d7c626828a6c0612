"""What a large table's precision costs in quality, on real weights (issues 15/16).

    python tools/bench/bench_large_table.py --fp32 <SmolLM2 fp32 artifact> \\
        [--variants float tied8 tied4] [--tokens 4096] [--json FILE]

A table of at least ``tied_table.TIED_TABLE_MIN_VALUES`` (64M) values is not kept float by
the default int4 (``QuantRecipe.large_table``): Qwen2.5-0.5B's, Llama-3.2-1B/3B's, the 8B's.
No real checkpoint that large is on this machine, so SmolLM2-135M's tied 49152 x 576 table
(28M values) is pushed through the same path with the threshold lowered, and the default
int4 (HQQ body, zero points folded) quantized with it:

- ``float``: the table float, the lm_head int8 (SmolLM2's default, the reference row);
- ``tied8``: the lookup reads the lm_head's int8 table (``large_table_bits=8``);
- ``tied4``: the lm_head int4 RTN with integer zero points, the lookup reading it
  (``large_table_bits=4``: ONNX Runtime GenAI's layout but for the zero points, half the
  table's bytes);
- ``tied4intzero``: ``tied4`` with the head's (and so the table's) int4 blocks chosen by
  ``int_zero.from_hqq`` (HQQ's grid, its zero point rounded down and up, the scale refit)
  instead of RTN: still integer zero points the lookup can read.

Each is judged by the quality card against the fp32 graph on the held-out text
(``tests/data/heldout_persuasion.txt``) and the packaged evaluation (tuning) text:
perplexity change, mean KL, top-1 agreement. One JSON row per variant (size, seconds,
cards, load average) is appended to ``--json``; the machine is shared: seconds are
inflated by the load recorded beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HELDOUT_TEXT = REPO / "tests" / "data" / "heldout_persuasion.txt"
VARIANTS = {
    "float": dict(large=False, recipe={}),
    "tied8": dict(large=True, recipe={}),
    "tied4": dict(large=True, recipe={"large_table_bits": 4}),
    "tied4intzero": dict(large=True, recipe={"large_table_bits": 4}, int_zero_head=True),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fp32", type=Path, required=True, help="fp32 artifact (SmolLM2-135M)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--tokens", type=int, default=4096, help="evaluation tokens of each card")
    ap.add_argument("--texts", nargs="+", choices=("heldout", "tuning"),
                    default=["heldout", "tuning"])
    ap.add_argument("--workdir", type=Path, default=REPO / "artifacts" / "bench" / "large-table")
    ap.add_argument("--json", type=Path, default=None, help="append one row per variant")
    args = ap.parse_args(argv)

    from slmedge.exporter.quality.card import QualitySettings, artifact_card
    from bench_gguf_int4 import card_figures  # a sibling script (tools/bench is sys.path[0])
    from slmedge.exporter.quantize import tied_table
    from slmedge.exporter.quantize.recipe import QuantRecipe
    from slmedge.exporter.quantize.streaming import quantize_file_streaming

    threshold = tied_table.TIED_TABLE_MIN_VALUES
    for name in args.variants:
        spec = VARIANTS[name]
        out = args.workdir / name
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        tied_table.TIED_TABLE_MIN_VALUES = 1 if spec["large"] else threshold
        recipe = QuantRecipe(scheme="int4", **spec["recipe"])
        row = {"name": name, "model": args.fp32.name, "recipe": spec["recipe"],
               "table_forced_large": spec["large"], "tokens": args.tokens,
               "load_start": os.getloadavg()}
        t0 = time.perf_counter()
        try:
            report = quantize_file_streaming(
                args.fp32 / "model.onnx", out / "model.onnx", recipe,
                progress=lambda m: print(f"[bench_large_table] {m}", file=sys.stderr, flush=True))
        finally:
            tied_table.TIED_TABLE_MIN_VALUES = threshold
        if spec.get("int_zero_head"):
            row["head_rounding"] = "int_zero.from_hqq"
            _int_zero_head(out / "model.onnx", args.fp32 / "model.onnx")
        row.update(label=recipe.label(), quantize_s=round(time.perf_counter() - t0, 1),
                   size_mb=round(sum(p.stat().st_size for p in out.glob("model.onnx*")) / 1e6, 2),
                   embedding=report.embedding, lm_head=report.lm_head)
        texts = {"heldout": HELDOUT_TEXT, "tuning": None}  # None: the packaged evaluation text
        for tag in args.texts:
            t1 = time.perf_counter()
            card = artifact_card(out / "model.onnx", args.fp32,
                                 QualitySettings(eval_text=texts[tag], eval_tokens=args.tokens,
                                                 prompts=()),
                                 reference_model=args.fp32 / "model.onnx", threads=2)
            row[tag] = {**card_figures(card), "seconds": round(time.perf_counter() - t1)}
        row["load_end"] = os.getloadavg()
        row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


def _int_zero_head(path: Path, fp32: Path) -> None:
    """Re-round the int4 lm_head of ``path`` (the MatMulNBits whose ``N`` is the vocabulary:
    the lookup reads the same initializers) with ``int_zero.from_hqq`` on the fp32 graph's
    weight, and save it in place."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from slmedge.exporter.quantize.int_zero import rewrite_int_zero

    model = onnx.load(str(path))
    head = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    vocab_k = None
    for n in model.graph.node:
        a = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
        if n.op_type == "MatMulNBits" and n.input[1] in {i for r in model.graph.node
                                                          if r.op_type == "Reshape"
                                                          and r.output[0] in head.input
                                                          for i in r.input}:
            head, vocab_k = n, (a["N"], a["K"])
    if vocab_k is None:
        raise SystemExit(f"{path}: no int4 lm_head shared with the lookup")
    vocab, k = vocab_k
    ref = onnx.load(str(fp32))
    table = next(numpy_helper.to_array(t) for t in ref.graph.initializer
                 if int(np.prod(t.dims)) == vocab * k)
    # the fp32 graph keeps the tied table once, [1, K, V] (passes.tied_head) or [V, K]
    w = table.reshape(k, vocab) if table.shape[-1] == vocab else table.reshape(vocab, k).T
    rewrite_int_zero(model, lambda n: np.ascontiguousarray(w, np.float32) if n is head else None)
    data = path.with_name(path.name + ".data")
    data.unlink()  # onnx appends to an existing data file; everything is in memory now
    onnx.save_model(model, str(path), save_as_external_data=True, location=data.name)


if __name__ == "__main__":
    sys.exit(main())
