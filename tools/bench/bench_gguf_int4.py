"""The default int4 of a GGUF model with the file's own blocks, and its quality on two texts.

    python tools/bench/bench_gguf_int4.py --gguf gemma-3-270m-q4_k_m.gguf \\
        --fp32 <fp32 artifact of the same file> --name default --tokens 1024 [--recipe JSON]

``bench_quant.py`` quantizes an fp32 artifact, which no longer knows its GGUF: the
``gguf_exact`` path (the file's Q4_0 / Q8_0 / Q5_0 / Q6_K / Q4_K blocks kept, never fewer
bits than the file: ``QuantRecipe.keep_source_bits``) runs only in ``slmedge export --model
X.gguf``. This script runs the same streaming quantizer with the file's blocks on the fp32
graph (no new trace), then the quality card against the fp32 graph on the held-out text
(``tests/data/heldout_persuasion.txt``) and/or the packaged evaluation (tuning) text. One
JSON row per run (size, seconds, card, load average, this process's peak RSS) is appended
to ``--json``. The machine is shared: seconds are inflated by the load recorded beside them.
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, required=True)
    ap.add_argument("--fp32", type=Path, required=True, help="fp32 artifact of the same GGUF")
    ap.add_argument("--name", required=True, help="row name; output in WORKDIR/NAME")
    ap.add_argument("--recipe", default="{}", help="QuantRecipe fields beside scheme=int4 (JSON)")
    ap.add_argument("--tokens", type=int, default=4096, help="evaluation tokens of each card")
    ap.add_argument("--texts", nargs="+", choices=("heldout", "tuning"),
                    default=["heldout", "tuning"])
    ap.add_argument("--workdir", type=Path, default=REPO / "artifacts" / "bench" / "gguf-int4")
    ap.add_argument("--json", type=Path, default=None, help="append the row to this file")
    args = ap.parse_args(argv)

    import torch

    from slmedge.exporter.sources.gguf import open_gguf_streamed
    from slmedge.exporter.quality.card import QualitySettings, artifact_card
    from slmedge.exporter.quantize.recipe import QuantRecipe
    from slmedge.exporter.quantize.streaming import quantize_file_streaming

    out = args.workdir / args.name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    row = {"name": args.name, "gguf": args.gguf.name, "recipe": json.loads(args.recipe),
           "tokens": args.tokens, "load_start": os.getloadavg()}
    _, _, _, weights = open_gguf_streamed(args.gguf, torch.float32)
    recipe = QuantRecipe(scheme="int4", **row["recipe"])
    t0 = time.perf_counter()
    report = quantize_file_streaming(
        args.fp32 / "model.onnx", out / "model.onnx", recipe, exact=weights.exact_blocks,
        progress=lambda m: print(f"[bench_gguf_int4] {m}", file=sys.stderr, flush=True))
    row.update(label=recipe.label(), quantize_s=round(time.perf_counter() - t0, 1),
               size_mb=round(sum(p.stat().st_size for p in out.glob("model.onnx*")) / 1e6, 1),
               weight_precision=report.weight_precision,
               gguf_exact={k: v for k, v in (report.gguf_exact or {}).items()
                           if k not in ("names", "nodes")})
    texts = {"heldout": HELDOUT_TEXT, "tuning": None}  # None: the packaged evaluation text
    for tag in args.texts:
        t1 = time.perf_counter()
        card = artifact_card(out / "model.onnx", args.fp32,
                             QualitySettings(eval_text=texts[tag], eval_tokens=args.tokens,
                                             prompts=()),
                             reference_model=args.fp32 / "model.onnx", threads=2)
        row[tag] = {"ppl_increase_pct": round(card.ppl_increase_pct, 2),
                    "kl_mean": round(card.kl_mean, 4),
                    "top1_agreement": round(card.top1_agreement_eval, 4),
                    "perplexity": round(card.perplexity, 3),
                    "reference_perplexity": round(card.reference_perplexity, 3),
                    "seconds": round(time.perf_counter() - t1)}
    row["load_end"] = os.getloadavg()
    row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(row))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
