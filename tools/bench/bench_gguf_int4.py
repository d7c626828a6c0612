"""The default int4 of a GGUF model with the file's own blocks, and its quality on two texts.

    python tools/bench/bench_gguf_int4.py --gguf gemma-3-270m-q4_k_m.gguf \\
        --fp32 <fp32 artifact of the same file> --name default --tokens 1024 [--recipe JSON]
    python tools/bench/bench_gguf_int4.py --gguf ... --fp32 ... --variants sweep.json

``bench_quant.py`` quantizes an fp32 artifact, which no longer knows its GGUF: the
``gguf_exact`` path (the file's Q4_0 / Q8_0 / Q5_0 / Q6_K / Q4_K blocks kept, never fewer
bits than the file: ``QuantRecipe.keep_source_bits``) runs only in ``slmedge export --model
X.gguf``. This script runs the same streaming quantizer with the file's blocks on the fp32
graph (no new trace), then the quality card against the fp32 graph on the held-out text
(``tests/data/heldout_persuasion.txt``) and/or the packaged evaluation (tuning) text. One
JSON row per run (size, seconds, card, load average, this process's peak RSS) is appended
to ``--json``. The machine is shared: seconds are inflated by the load recorded beside them.

Sensitivity (``--variants``: a JSON list of ``{"name", "recipe", "requantize"}``): each
variant is quantized and carded in turn against one recording of the fp32 graph's logits
per text (quality.RecordedReference: the reference runs once). ``requantize`` lists groups
``KIND`` or ``KIND@LO-HI`` (layers LO..HI) whose wider-than-4-bit file blocks are withheld
from the quantizer, so it rounds their dequantized values to int4 (HQQ) as it does any
other weight; kinds: ``qkv``, ``o``, ``gate_up``, ``down`` (the graph's packed MatMuls).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HELDOUT_TEXT = REPO / "tests" / "data" / "heldout_persuasion.txt"


def card_figures(card) -> dict:
    """A card's figures as a bench row holds them (bench_large_table.py's rows too)."""
    return {"ppl_increase_pct": round(card.ppl_increase_pct, 2),
            "kl_mean": round(card.kl_mean, 4),
            "top1_agreement": round(card.top1_agreement_eval, 4),
            "perplexity": round(card.perplexity, 3),
            "reference_perplexity": round(card.reference_perplexity, 3)}


KINDS = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o",
         "gate_proj": "gate_up", "up_proj": "gate_up", "down_proj": "down"}


def _group_filter(exact, groups: list[str]):
    """``exact`` without the wider-than-4-bit blocks of the modules in ``groups``."""
    if not groups:
        return exact
    specs = []
    for g in groups:
        m = re.fullmatch(r"(qkv|o|gate_up|down)(?:@(\d+)-(\d+))?", g)
        if not m:
            raise SystemExit(f"requantize group '{g}': use KIND or KIND@LO-HI, kinds "
                             f"{sorted(set(KINDS.values()))}")
        specs.append((m.group(1), int(m.group(2) or 0), int(m.group(3) or 10**6)))

    def filtered(module: str):
        blocks = exact(module)
        m = re.search(r"layers\.(\d+)\.\w+\.(\w+)$", module)
        if m is None or getattr(blocks, "bits", 4) <= 4:
            return blocks
        layer, kind = int(m.group(1)), KINDS.get(m.group(2))
        if any(kind == k and lo <= layer <= hi for k, lo, hi in specs):
            return None  # the quantizer rounds the dequantized values to int4
        return blocks

    return filtered


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, required=True)
    ap.add_argument("--fp32", type=Path, required=True, help="fp32 artifact of the same GGUF")
    ap.add_argument("--name", help="row name; output in WORKDIR/NAME")
    ap.add_argument("--recipe", default="{}", help="QuantRecipe fields beside scheme=int4 (JSON)")
    ap.add_argument("--requantize", nargs="*", default=[], metavar="GROUP",
                    help="groups whose wider file blocks go to int4 (see above)")
    ap.add_argument("--variants", type=Path, help="JSON list of {name, recipe, requantize}")
    ap.add_argument("--tokens", type=int, default=4096, help="evaluation tokens of each card")
    ap.add_argument("--texts", nargs="+", choices=("heldout", "tuning"),
                    default=["heldout", "tuning"])
    ap.add_argument("--workdir", type=Path, default=REPO / "artifacts" / "bench" / "gguf-int4")
    ap.add_argument("--keep", action="store_true", help="keep each variant's output")
    ap.add_argument("--json", type=Path, default=None, help="append the rows to this file")
    args = ap.parse_args(argv)
    if args.variants:
        variants = json.loads(args.variants.read_text())
    elif args.name:
        variants = [{"name": args.name, "recipe": json.loads(args.recipe),
                     "requantize": args.requantize}]
    else:
        ap.error("give --name (one run) or --variants")

    import torch

    from slmedge.exporter.sources.gguf import open_gguf_streamed
    from slmedge.exporter.quality.card import (QualitySettings, decoder_card, finish_greedy,
                                               record_reference)
    from slmedge.exporter.quality.memory import release_memory, verification_session_options
    from slmedge.exporter.quantize.recipe import QuantRecipe
    from slmedge.exporter.quantize.streaming import quantize_file_streaming
    from slmedge.runtimes.sessions.onnx_decoder import OnnxDecoder

    _, _, _, weights = open_gguf_streamed(args.gguf, torch.float32)
    texts = {"heldout": HELDOUT_TEXT, "tuning": None}  # None: the packaged evaluation text
    settings = {tag: QualitySettings(eval_text=texts[tag], eval_tokens=args.tokens, prompts=())
                for tag in args.texts}
    args.workdir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".bench-gguf-ref-", dir=args.workdir))
    recorded = {}
    try:
        for tag in args.texts:  # the fp32 graph's logits, once per text
            t1 = time.perf_counter()
            reference = OnnxDecoder(args.fp32 / "model.onnx", threads=2,
                                    session_options=verification_session_options())
            recorded[tag] = record_reference(reference, args.fp32, settings[tag],
                                             scratch / f"{tag}.logits")
            del reference
            release_memory()
            print(f"[bench_gguf_int4] reference {tag}: {time.perf_counter() - t1:.0f} s",
                  file=sys.stderr, flush=True)
        for variant in variants:
            row = _run(variant, args, weights, recorded, settings, QuantRecipe,
                       quantize_file_streaming, OnnxDecoder, decoder_card, finish_greedy,
                       verification_session_options, release_memory)
            print(json.dumps(row), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


def _run(variant, args, weights, recorded, settings, QuantRecipe, quantize_file_streaming,
         OnnxDecoder, decoder_card, finish_greedy, session_options, release_memory) -> dict:
    out = args.workdir / variant["name"]
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    groups = list(variant.get("requantize", []))
    row = {"name": variant["name"], "gguf": args.gguf.name, "recipe": variant.get("recipe", {}),
           "requantize": groups, "tokens": args.tokens, "load_start": os.getloadavg()}
    recipe = QuantRecipe(scheme="int4", **row["recipe"])
    t0 = time.perf_counter()
    report = quantize_file_streaming(
        args.fp32 / "model.onnx", out / "model.onnx", recipe,
        exact=_group_filter(weights.exact_blocks, groups),
        progress=lambda m: print(f"[bench_gguf_int4] {m}", file=sys.stderr, flush=True))
    row.update(label=recipe.label(), quantize_s=round(time.perf_counter() - t0, 1),
               size_mb=round(sum(p.stat().st_size for p in out.glob("model.onnx*")) / 1e6, 1),
               weight_precision=report.weight_precision,
               gguf_exact={k: v for k, v in (report.gguf_exact or {}).items()
                           if k not in ("names", "nodes")})
    row["gguf_exact"]["requantized"] = {k: v for k, v in row["gguf_exact"]["requantized"].items()
                                        if k != "names"}
    for tag, ref in recorded.items():
        t1 = time.perf_counter()
        ref._replay = 0  # the recording replays from its first call for each variant
        candidate = OnnxDecoder(out / "model.onnx", threads=2, session_options=session_options())
        card = decoder_card(candidate, args.fp32, settings[tag], reference=ref,
                            score_greedy=False)
        del candidate
        release_memory()
        finish_greedy(card)
        row[tag] = {**card_figures(card), "seconds": round(time.perf_counter() - t1)}
    row["load_end"] = os.getloadavg()
    row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return row


if __name__ == "__main__":
    sys.exit(main())
