"""Flags of quantization and the quality gate, and the ``slmedge quantize`` subcommand.

``add_quant_flags`` is shared by ``slmedge export`` and ``slmedge quantize``; flags map
one-to-one onto :class:`QuantRecipe` / :class:`QualityConfig` fields (no key=value bags).
Heavy imports happen inside the command, so building the parser stays torch- and
onnx-free. The library (``exporter.quantize``) knows nothing of flags: it takes the typed
recipe and a ``say(message)`` callback, which :class:`Progress` draws here.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from slmedge.device_profiles.schema import ONNX_SCHEMES
from slmedge.exporter.quantize.recipe import (
    CalibrationMethod,
    CalibrationPrefix,
    Int4Algorithm,
    Int8Format,
    QdqWriter,
    TensorPrecision,
)
from slmedge.runtimes.manifest_schema import Manifest, validate_manifest


def add_quant_flags(p: argparse.ArgumentParser, *, required: bool = False,
                    extra_choices: Sequence[str] = (), extra_help: str = "") -> None:
    """The quantization and quality-gate flags. ``extra_choices`` / ``extra_help``: more
    ``--quant`` names another format offers (``slmedge export --format tflite``'s)."""
    g = p.add_argument_group("quantization (onnxruntime.quantization)")
    g.add_argument("--quant", choices=list(dict.fromkeys([*(s.value for s in ONNX_SCHEMES),
                                                          *extra_choices])),
                   required=required,
                   help="int4: MatMulNBits 4-bit weights; int8: int8 weights, dynamic activations; "
                   "int8-static: QDQ calibrated on text; a16w8: QDQ 16-bit activations (NPUs)"
                   + (f"; {extra_help}" if extra_help else ""))
    g.add_argument("--calibration", type=Path, metavar="FILE",
                   help="calibration text (static QDQ, gptq, gptq-act, --lm-head-int8-tokens); "
                   "default: the packaged calib_emma.txt (Emma)")
    g.add_argument("--calib-method", choices=[m.value for m in CalibrationMethod],
                   help="static range estimator (default minmax)")
    g.add_argument("--calib-prefix", choices=[p.value for p in CalibrationPrefix],
                   help="static QDQ, minmax: each layer's ranges from the float graph's "
                   "activations (float, default) or through the earlier layers already QDQ'd "
                   "(quantized)")
    g.add_argument("--calib-writer", choices=[w.value for w in QdqWriter],
                   help="static QDQ: write the graph one calibration segment at a time (segments, "
                   "default: the same graph in less memory) or with quantize_static on the whole "
                   "graph (whole)")
    g.add_argument("--calib-samples", type=int, metavar="N",
                   help="calibration samples (a quarter prefill, the rest decode steps; default 32)")
    g.add_argument("--block-size", type=int, choices=[16, 32, 64, 128, 256],
                   help="weights per scale for MatMulNBits (default 32)")
    g.add_argument("--mlp-block-size", type=int, choices=[16, 32, 64, 128, 256],
                   help="int4: block size of the MLP input projections (gate/up; default: "
                   "--block-size)")
    g.add_argument("--block-sizes", type=_kind_blocks, metavar="KIND=N,...",
                   help="int8 (nbits): a block size per weight kind (q, k, v, o, gate, up, down, "
                   "lm_head), the others at --block-size (default: none, --block-size "
                   "everywhere; e.g. o=64,gate=64,up=64,down=64)")
    g.add_argument("--symmetric", action="store_true", help="int4/nbits: no zero points")
    g.add_argument("--algorithm", choices=[a.value for a in Int4Algorithm],
                   help="int4 rounding: hqq (default; rtn with --symmetric), rtn, k_quant, gptq "
                   "(ORT's, calibrated), gptq-act (calibrated, activation order, integer zero "
                   "points: the fast kernels at HQQ-like quality)")
    g.add_argument("--accuracy-level", type=int, choices=[0, 1, 2, 3, 4],
                   help="MatMulNBits compute: 4 = int8 activations (default), 1 = fp32, 0 = unset")
    g.add_argument("--int8-format", choices=[f.value for f in Int8Format],
                   help="int8: nbits (MatMulNBits 8-bit, default) or qoperator (quantize_dynamic)")
    g.add_argument("--lm-head", choices=[t.value for t in TensorPrecision],
                   help="lm_head precision (default int8 for int4/int8, float for static)")
    g.add_argument("--lm-head-int8-tokens", type=int, metavar="N",
                   help="with --lm-head int4: the N most frequent tokens of the calibration text "
                   "keep int8 lm_head rows (a split lm_head)")
    g.add_argument("--embedding", choices=["float", "int8", "int4"],
                   help="embedding table (default float; int8/int4: GatherBlockQuantized)")
    g.add_argument("--large-table-bits", type=int, choices=[4, 8],
                   help="int4: bits of a large embedding table tied to the lm_head (8, default: "
                   "the head int8 and the lookup reads its table; 4: table and head int4 RTN, "
                   "GenAI's layout, half the bytes, less faithful)")
    g.add_argument("--large-table-int8-tokens", type=int, metavar="N",
                   help="with --large-table-bits 4: the N most frequent tokens of the calibration "
                   "text keep 8-bit rows of the large tied table (head and lookup), the rest 4-bit "
                   "rounded by GPTQ (a split table; 0: none)")
    g.add_argument("--zero-point-storage", choices=["float16", "float32", "uint12", "uint8",
                                                    "int8", "int8-a8"],
                   help="int4 with float zero points (HQQ): the folded correction stored as fp16 "
                   "(default: 2 bytes per block, zero points moved by <= ~0.004 step), fp32 (4 "
                   "bytes, exact), a 12-bit code per block (1.5 bytes, higher peak RSS while ORT "
                   "loads it) or an 8-bit one (less faithful); int8 / int8-a8: applied by an "
                   "8-bit MatMulNBits (1 byte per block in memory too; a8: its inputs int8)")
    g.add_argument("--keep-layers", type=lambda s: [int(x) for x in s.split(",") if x],
                   metavar="I,J", help="decoder layers kept one precision step up")
    q = p.add_argument_group("quality card and gate")
    q.add_argument("--max-ppl-increase", type=float, metavar="PCT",
                   help="refuse an artifact (quantized, or a float static export vs PyTorch) whose "
                   "perplexity rises more (default 5); exit 3")
    q.add_argument("--max-kl-mean", type=float, metavar="NATS",
                   help="refuse a quantized artifact whose mean KL(fp32 || quantized) of the "
                   "next-token distributions on the eval text is larger (default 0.15); exit 3")
    q.add_argument("--min-top1-agreement", type=float, metavar="FRACTION",
                   help="refuse a quantized artifact whose top-1 token matches fp32's on a "
                   "smaller share of the eval text's positions (0-1, default 0.5); exit 3")
    q.add_argument("--auto", action="store_true",
                   help="try recipes from the smallest up; keep the smallest inside the gate")
    q.add_argument("--eval-text", type=Path, metavar="FILE",
                   help="evaluation text (default: the packaged eval_mansfield_park.txt)")
    q.add_argument("--eval-tokens", type=int, metavar="N", help="score the first N tokens (4096)")


def _kind_blocks(text: str) -> dict[str, int]:
    """``--block-sizes``: ``down=32,lm_head=64`` -> ``{"down": 32, "lm_head": 64}`` (the recipe
    checks the kinds and sizes); ``none`` -> ``{}``."""
    if text.strip().lower() == "none":
        return {}
    out = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        kind, sep, size = item.partition("=")
        if not sep or not size.strip().isdigit():
            raise argparse.ArgumentTypeError(f"'{item}' is not KIND=N (e.g. down=32,lm_head=64)")
        out[kind.strip()] = int(size)
    return out


def quant_fields(args) -> dict:
    """The ``quant`` (recipe) and ``quality`` dicts for the config objects, from the flags."""
    out: dict = {}
    recipe: dict = {}
    for flag, key in (("block_size", "block_size"), ("mlp_block_size", "mlp_block_size"),
                      ("block_sizes", "block_sizes"),
                      ("algorithm", "algorithm"),
                      ("accuracy_level", "accuracy_level"), ("int8_format", "int8_format"),
                      ("lm_head", "lm_head"), ("embedding", "embedding"),
                      ("keep_layers", "keep_layers"), ("lm_head_int8_tokens", "lm_head_int8_tokens"),
                      ("large_table_bits", "large_table_bits"),
                      ("large_table_int8_tokens", "large_table_int8_tokens"),
                      ("zero_point_storage", "zero_point_storage")):
        value = getattr(args, flag, None)
        if value is not None:
            recipe[key] = value
    if getattr(args, "symmetric", False):
        recipe["symmetric"] = True
    calib: dict = {}
    if getattr(args, "calibration", None) is not None:
        calib["text"] = str(args.calibration)
    if getattr(args, "calib_method", None):
        calib["method"] = args.calib_method
    if getattr(args, "calib_prefix", None):
        calib["prefix"] = args.calib_prefix
    if getattr(args, "calib_writer", None):
        calib["writer"] = args.calib_writer
    if getattr(args, "calib_samples", None):
        n = args.calib_samples
        calib["decode_samples"] = n - max(n // 4, 1)
        calib["prefill_samples"] = max(n // 4, 1)
    if calib:
        recipe["calibration"] = calib
    if getattr(args, "quant", None):
        out["quant"] = {"scheme": args.quant, **recipe}
    elif recipe:
        from slmedge.runtimes.errors import UsageError

        raise UsageError(f"quantization flags ({', '.join(sorted(recipe))}) need --quant")
    quality: dict = {}
    for flag in ("max_ppl_increase", "max_kl_mean", "min_top1_agreement", "eval_text",
                 "eval_tokens"):
        value = getattr(args, flag, None)
        if value is not None:
            quality[flag] = str(value) if isinstance(value, Path) else value
    if getattr(args, "auto", False):
        quality["auto"] = True
    if quality:
        out["quality"] = quality
    return out


def cmd_quantize(args) -> int:
    from pydantic import ValidationError

    from slmedge.exporter.quantize.pipeline import QualityConfig, quantize_artifact
    from slmedge.runtimes.errors import UsageError, validation_problems
    from slmedge.exporter.quantize.recipe import QuantRecipe

    from .progress import Progress

    fields = quant_fields(args)
    try:
        recipe = QuantRecipe(**fields["quant"])
        quality = QualityConfig(**fields.get("quality", {}))
    except ValidationError as e:
        raise UsageError(f"invalid quantization settings: {validation_problems(e)}") from None
    if args.dry_run:
        doc = {"quant": recipe.model_dump(mode="json"), "quality": quality.model_dump(mode="json")}
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return 0
    progress = Progress()
    try:
        manifest = quantize_artifact(Path(args.artifact), Path(args.output), recipe, quality,
                                     overwrite=args.overwrite, say=progress.say)
    finally:
        progress.close()
    from slmedge.tools.cli.results import store_quality

    store_quality(args, manifest, args.output)  # the results store, unless --no-store
    if args.json:
        sys.stdout.write(json.dumps({"output": str(args.output), **manifest}, indent=2) + "\n")
    else:
        print(summary_line(manifest, args.output))
    return 0


def summary_line(manifest: Manifest | dict, output) -> str:
    """One line on what was written: size, recipe, the quality card and the gate."""
    m = manifest if not isinstance(manifest, dict) else validate_manifest(
        manifest, Path(output) / "manifest.json")
    q = m.quality
    label = (m.quantization.label if m.quantization else None) or m.recipe.dtype
    line = f"wrote {output} ({m.model_bytes() / 1e6:.1f} MB, {label})"
    if q is not None and q.perplexity is not None:
        line += f"; perplexity {q.perplexity:.3f}"
        if q.reference_perplexity is not None:
            line += (f" vs fp32 {q.reference_perplexity:.3f} ({q.ppl_increase_pct:+.2f}%), "
                     f"KL {q.kl_mean:.4f}")
            if q.greedy:
                line += f", greedy top-1 agreement {q.greedy['top1_agreement']:.1%}"
    gate = m.gate
    if gate and gate.auto:
        line += f"; --auto tried {len(gate.tried)}: " + ", ".join(
            f"{t['label']} {t['ppl_increase_pct']:+.2f}%"
            + ("" if t["passed"] else f" (over: {', '.join(t.get('failed') or ['perplexity'])})")
            for t in gate.tried)
    return line


def register(sub) -> None:
    """Add ``slmedge quantize`` (tools/cli/app.py COMMAND_MODULES hook)."""
    from slmedge.runtimes.errors import EXIT_CODES_HELP

    p = sub.add_parser(
        "quantize", help="quantize an fp32 artifact (quality card + perplexity gate)",
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Quantize the graph of an fp32 artifact written by `slmedge export`, without "
        "exporting again. The fp32 graph is the reference of the quality card; the new "
        "manifest records where it came from (derived_from).",
    )
    p.add_argument("artifact", help="fp32 artifact directory")
    p.add_argument("--output", "-o", required=True, type=Path, help="artifact directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    p.add_argument("--dry-run", action="store_true", help="print the resolved settings and stop")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    add_quant_flags(p, required=True)
    p.set_defaults(func=cmd_quantize)
