"""``slmedge export --format tflite``: its flags, the config they build, the command.

The typed config (:class:`TfliteExportConfig`) and the profile's fields are the library's
(``exporter/tflite/options.py``); this module turns flags into them and draws progress.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from slmedge.exporter.tflite.options import (
    DEFAULT_CHUNKS,
    DEFAULT_CONTEXT,
    QUANT_ALIASES,
    TFLITE_QUANT_CHOICES,
    TfliteExportConfig,
    parse_quant,
    profile_fields,
    require_tflite_extra,
)
from slmedge.runtimes.errors import UsageError, validation_problems

#: What ``--quant`` also accepts with ``--format tflite`` (``add_quant_flags``'s extra help).
TFLITE_QUANT_HELP = "with --format tflite: " + ", ".join(TFLITE_QUANT_CHOICES)


def config_from_args(args) -> TfliteExportConfig:
    """Flags (and ``--profile`` / ``--config``) -> :class:`TfliteExportConfig`."""
    from pydantic import ValidationError

    fields: dict = {}
    if getattr(args, "config", None):
        try:
            fields = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UsageError(f"--config {args.config}: cannot read it as JSON ({e})") from None
    if getattr(args, "profile", None):
        fields.update(profile_fields(args.profile))
    for name in (
        "model",
        "output",
        "parity_atol",
        "context_length",
        "prefill_chunks",
        "eval_text",
        "eval_tokens",
        "from_artifact",
        "max_ppl_increase",
    ):
        value = getattr(args, name, None)
        if value is not None:
            fields[name] = str(value) if isinstance(value, Path) else value
    if getattr(args, "quant", None):
        fields["quant"] = parse_quant(args.quant).value
    if getattr(args, "overwrite", False):
        fields["overwrite"] = True
    dtype = getattr(args, "dtype", None)
    if dtype == "fp16":
        if fields.get("quant", "fp32") not in ("fp32", "fp16"):
            raise UsageError("--dtype fp16 and --quant exclude each other with --format tflite")
        fields["quant"] = "fp16"
    for onnx_gate in ("max_kl_mean", "min_top1_agreement"):
        if getattr(args, onnx_gate, None) is not None:
            raise UsageError(f"--{onnx_gate.replace('_', '-')} is a bound of the ONNX quality gate; "
                             "the TFLite gate checks perplexity only (--max-ppl-increase): drop "
                             "the flag or export --format onnx")
    for onnx_only in ("opset", "external_data"):
        if getattr(args, onnx_only, None):
            raise UsageError(f"--{onnx_only.replace('_', '-')} applies to --format onnx only")
    if "output" not in fields:
        raise UsageError("slmedge export needs --output DIR (or a --config file that names one)")
    fields["format"] = "tflite"
    try:
        return TfliteExportConfig(**fields)
    except ValidationError as e:
        raise UsageError(f"invalid TFLite export config: {validation_problems(e)}") from None


def add_tflite_flags(parser) -> None:
    """``--format`` and the TFLite-only flags of ``slmedge export`` (its ``--quant`` names come
    with the quantization flags: ``add_quant_flags(p, extra_choices=TFLITE_QUANT_CHOICES,
    extra_help=TFLITE_QUANT_HELP)``)."""
    g = parser.add_argument_group("TFLite (--format tflite)")
    g.add_argument(
        "--format",
        choices=["onnx", "tflite"],
        help="artifact format (default onnx, or what --profile writes); tflite needs "
        "the [tflite] venv: tools/setup_tflite.sh",
    )
    g.add_argument(
        "--context-length",
        type=int,
        metavar="N",
        help=f"static KV-cache rows (default {DEFAULT_CONTEXT})",
    )
    g.add_argument(
        "--prefill-chunks",
        metavar="T,T",
        type=lambda s: [int(x) for x in s.split(",") if x],
        help=f"prefill signature sizes (default {','.join(map(str, DEFAULT_CHUNKS))})",
    )
    g.add_argument(
        "--from-artifact",
        type=Path,
        metavar="DIR",
        help="quantize the graph of this fp32 TFLite artifact (same model and sizes) "
        "instead of converting again",
    )


def wants_tflite(args) -> bool:
    """Whether ``slmedge export`` takes the TFLite path: ``--format tflite``, or a profile that
    writes tflite only. TFLite-only flags with the ONNX path are a usage error."""
    fmt = getattr(args, "format", None)
    if fmt is None and getattr(args, "profile", None):
        from slmedge.device_profiles.loader import load_profile

        formats = {f.value for f in load_profile(args.profile).artifact.formats}
        fmt = "tflite" if formats == {"tflite"} else "onnx"
    if fmt == "tflite":
        return True
    given = [
        flag
        for flag, name in (
            ("--context-length", "context_length"),
            ("--prefill-chunks", "prefill_chunks"),
            ("--from-artifact", "from_artifact"),
        )
        if getattr(args, name, None) is not None
    ]
    quant = getattr(args, "quant", None)
    if quant in TFLITE_QUANT_CHOICES and quant not in QUANT_ALIASES and quant != "int8-static":
        given.append(f"--quant {quant}")
    if given:
        raise UsageError(f"{', '.join(given)} apply to --format tflite only; add --format tflite")
    return False


def cmd_export_tflite(args) -> int:
    """``slmedge export --format tflite``: build the config, run the export, print a summary."""
    config = config_from_args(args)
    if getattr(args, "dry_run", False):
        sys.stdout.write(json.dumps(json.loads(config.model_dump_json()), indent=2) + "\n")
        return 0
    require_tflite_extra()
    from slmedge.exporter.tflite.export import run_tflite_export

    from .progress import Progress

    progress = Progress()
    try:
        manifest = run_tflite_export(config, progress=progress.say,
                                     command=getattr(args, "command_line", None))
    finally:
        progress.close()
    from slmedge.tools.cli.results import store_quality

    store_quality(args, manifest, config.output)  # the results store, unless --no-store
    if getattr(args, "json", False):
        sys.stdout.write(
            json.dumps({"output": str(config.output), **manifest}, indent=2, default=str) + "\n"
        )
    else:
        print(summary_line(manifest, config.output))
    return 0


def summary_line(manifest: dict, output) -> str:
    """One line on the TFLite export: size, recipe, parity and the quality card."""
    from slmedge.runtimes.manifest_schema import validate_manifest

    m = validate_manifest(manifest, Path(output) / "manifest.json")
    parity = m.verification.parity
    line = (
        f"exported {m.architecture.family} to {output} ({m.model_bytes() / 1e6:.1f} MB TFLite, "
        f"{m.recipe.quant}); parity max |diff| {parity.max_abs_diff:.2e} <= {parity.atol:.2e}"
    )
    card = m.quality
    if card is not None and card.perplexity is not None:
        line += f"; perplexity {card.perplexity:.3f}"
        if card.reference_perplexity is not None:
            line += f" vs fp32 {card.reference_perplexity:.3f} ({card.ppl_increase_pct:+.2f}%)"
        if card.greedy:
            line += f", greedy agreement {card.greedy['top1_agreement']:.1%}"
    return line
