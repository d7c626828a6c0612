"""``slmedge bundle`` and ``slmedge verify``: an artifact made ready for an app, and checked.

Registered through ``COMMAND_MODULES`` in ``tools/cli/app.py``; thin: flags -> library call.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from slmedge.runtimes.errors import EXIT_CODES_HELP, EXIT_OK, MissingDependency

#: slmedge.exporter.bundle.build.BUNDLE_FORMATS, repeated so the parser does not import onnx.
BUNDLE_FORMATS_CHOICES = ("onnx", "ort")


def _print_json(doc) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    sys.stdout.flush()


def cmd_bundle(args) -> int:
    from slmedge.device_profiles import load_profile
    from slmedge.runtimes.artifact import open_artifact

    from slmedge.tools.cli.profiles import memory_gate

    profile = load_profile(args.profile)
    refused = memory_gate(args, args.artifact, args.profile)
    if refused is not None:
        return refused
    if open_artifact(args.artifact).format != "tflite":
        try:
            import onnx  # noqa: F401  (bundle reads and rewrites graphs; verify does not need it)
        except ImportError:
            raise MissingDependency(
                "slmedge bundle needs the onnx package for an ONNX artifact, which is not "
                "installed: pip install 'slmedge[export]' (slmedge verify runs without it)"
            ) from None
    from slmedge.exporter.bundle.build import build_bundle

    say = (lambda m: print(m, file=sys.stderr)) if not args.json else None
    manifest = build_bundle(args.artifact, profile, args.output, make_zip=args.zip,
                            overwrite=args.overwrite, command=args.command_line, say=say,
                            model_format=args.format)
    out = Path(args.output)
    if args.json:
        _print_json({"output": str(out), **({"zip": f"{out}.zip"} if args.zip else {}),
                     **manifest})
        return EXIT_OK
    from slmedge.runtimes.manifest_schema import validate_manifest

    m = validate_manifest(manifest, out / "manifest.json")
    size = sum(f.size for f in m.files.values()) / 1e6
    if m.onnxruntime:
        runtime = f"ONNX Runtime >= {m.onnxruntime['minimum']}"
    else:
        runtime = f"LiteRT (checked with {m.litert['verified_with']})"
    genai = m.genai_config or f"none ({m.genai_config_reason})"
    bench = m.last_bench
    bench = (f"{bench['decode_tokens_per_s']} tok/s decode, {bench['ttft_ms']} ms TTFT "
             f"({bench['target']}, {bench['started_at']})" if bench else "none")
    shipped = m.model_format
    copies = f", weights x{shipped['weights_copies']}" if shipped["weights_copies"] > 1 else ""
    print(f"bundled {args.artifact} for {profile.name} in {out} ({len(m.files)} files, "
          f"{size:.1f} MB, {shipped['shipped']}{copies}); {runtime}; genai_config: {genai}; "
          f"last bench: {bench}")
    if args.zip:
        print(f"zip: {out}.zip")
    for note in m.notes:
        print(f"note: {note}", file=sys.stderr)
    return EXIT_OK


def cmd_verify(args) -> int:
    from slmedge.runtimes.check.verify import verify_bundle

    where = None
    if getattr(args, "target", None):
        if args.no_parity:
            from slmedge.runtimes.errors import UsageError

            raise UsageError("--target runs the checks where the app will run, parity "
                             "included; drop --no-parity, or drop --target to check the files "
                             "on this machine")
        from slmedge.runtimes.check.remote_card import run_remote_verify

        remote = run_remote_verify(args.target, args.bundle, runtime_version=args.runtime_version)
        where = f"{remote['target']} ({remote['platform']['machine']}, onnxruntime " \
                f"{remote['platform']['onnxruntime']})"
        if args.json:
            _print_json({"target": remote["target"], "platform": remote["platform"],
                         **remote["report"]})
            return EXIT_OK
        from types import SimpleNamespace

        report = SimpleNamespace(**remote["report"])  # VerifyReport.to_dict()'s fields
    else:
        report = verify_bundle(args.bundle, runtime_version=args.runtime_version,
                               parity=not args.no_parity)
    if args.json:
        _print_json(report.to_dict())
        return EXIT_OK
    parity = report.parity
    line = f"{args.bundle}: {report.files_checked} files match the manifest"
    if report.runtime_version:
        line += f"; runs on ONNX Runtime {report.runtime_version} (needs >= " \
                f"{report.minimum_onnxruntime})"
    by_format: dict[tuple, list[str]] = {}
    for rel, facts in report.ort_files.items():
        key = (facts["format_version"], facts["minimum_onnxruntime"], facts["converted_with"])
        by_format.setdefault(key, []).append(rel)
    for (version, first, made), names in by_format.items():
        line += (f"; {', '.join(names)}: ORT format v{version}"
                 + (f", read from ONNX Runtime {first} on" if first else "")
                 + (f", converted by onnxruntime {made}" if made else ""))
    if parity and "skipped" not in parity:
        line += (f"; parity: {parity['tokens']} greedy tokens match, first-step logits max "
                 f"|diff| {parity['max_abs_diff']:.1e}")
    if where:
        line += f" (checked on {where})"
    print(line)
    return EXIT_OK


def register(sub) -> None:
    """Add ``bundle`` and ``verify`` to the ``slmedge`` parser."""
    import argparse

    from slmedge.tools.cli.profiles import add_context_flag

    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "bundle", help="package an artifact for an app (model, tokenizer, genai_config, snippets)",
        description="Copy an exported artifact into OUT with a genai_config.json for ONNX "
        "Runtime GenAI, Android/iOS integration snippets rendered from the profile, and a "
        "manifest (sha256 of every file, opset / IR / contrib ops, minimum ONNX Runtime "
        "version, last slmedge bench result, parity reference) that slmedge verify checks. "
        "A profile with artifact.formats [tflite] (engine litert) takes a TFLite artifact "
        "(slmedge export --format tflite). One model format is shipped (--format): an app "
        "loads the .onnx graphs or the .ort ones, not both. Written atomically.",
        epilog=EXIT_CODES_HELP, formatter_class=fmt)
    p.add_argument("artifact", help="artifact directory written by slmedge export")
    p.add_argument("--profile", required=True, help="built-in profile name or a YAML file")
    p.add_argument("-o", "--output", required=True, help="bundle directory to write")
    p.add_argument("--format", choices=BUNDLE_FORMATS_CHOICES, default=None,
                   help="model format to ship: onnx (the graphs + their shared external "
                   "weights file) or ort (ORT format, for a minimal ONNX Runtime build; each "
                   ".ort holds its own copy of the weights). Default: the first of the "
                   "profile's artifact.formats that the artifact has")
    p.add_argument("--zip", action="store_true", help="also write OUTPUT.zip")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    p.add_argument("--strict", action="store_true", help="exit 4 when weights + KV cache "
                   "exceed the profile's device.ram_budget_mb (default: a warning)")
    add_context_flag(p)
    p.add_argument("--json", action="store_true", help="print one JSON document (the manifest)")
    p.set_defaults(func=cmd_bundle)

    p = sub.add_parser(
        "verify", help="re-check a bundle: hashes, runtime version, parity",
        description="Re-hash every file against the bundle manifest (exit 1 naming a missing, "
        "truncated or altered file), read each .ort file's ORT format version (exit 1 naming "
        "a file that is no ORT format file), check opset / IR version / contrib ops and the "
        "ORT format version against --runtime-version (exit 4 naming the op, opset or .ort "
        "file), then replay the recorded prompt "
        "and compare greedy tokens and logits (exit 3 if they differ). Needs only onnxruntime "
        "and numpy (ai-edge-litert for a TFLite bundle).",
        epilog=EXIT_CODES_HELP, formatter_class=fmt)
    p.add_argument("bundle", help="bundle directory written by slmedge bundle")
    p.add_argument("--runtime-version", metavar="X.Y",
                   help="ONNX Runtime version of the app, e.g. 1.20")
    p.add_argument("--no-parity", action="store_true", help="skip the parity run")
    p.add_argument("--target", metavar="URL",
                   help="run the checks on the device instead: ssh://[user@]host[:port][/dir] "
                   "or adb://[serial] (bundle copied there, runtime venv as bench --target's); "
                   "the recorded tokens are then checked where the app will run")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_verify)
