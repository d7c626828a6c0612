"""``slmedge fuse MODEL.onnx [-o OUT.onnx] [--json]``: the fusion passes on any decoder ONNX file.

``slmedge export`` fuses its own graphs; this is for a graph written elsewhere with the slmedge /
Optimum KV-cache contract. Only the ONNX file is rewritten: an slmedge artifact's manifest
(sha256s, fusion report) is not, so ``slmedge verify`` would flag it; re-export such an artifact
without ``--no-fuse`` instead. The maximum length and sliding windows come from ``config.json``
beside the model unless ``--config`` names one. Was ``python -m slmedge.exporter.passes``
(issue 13: the library carries no CLI).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from slmedge.runtimes.errors import EXIT_CODES_HELP, EXIT_OK, MissingDependency, UsageError


def _options(args):
    """The FusionOptions of the command line: the HF config's, then the flags over it."""
    from slmedge.exporter.passes import FusionOptions

    config = args.config or args.model.parent / "config.json"
    if args.config is not None and not config.is_file():
        raise UsageError(f"--config {config}: no such file; give the model's HF config.json, or "
                         "leave --config out to read the one beside the model")
    if config.is_file():
        try:
            doc = json.loads(config.read_text(encoding="utf-8"))
            if not isinstance(doc, dict):
                raise ValueError(f"a JSON {type(doc).__name__}, not an object")
            options = FusionOptions.from_hf_config(doc)
        except (UnicodeDecodeError, TypeError, ValueError) as e:  # JSONDecodeError included
            raise UsageError(f"{config} is not a Hugging Face config.json ({e}); name another "
                             "with --config") from None
    else:  # nothing beside the model: the defaults (4096 positions, no sliding windows)
        options = FusionOptions()
    if args.max_sequence_length:
        options.max_sequence_length = args.max_sequence_length
    options.logits_to_keep = not args.no_logits_to_keep
    return options


def cmd_fuse(args) -> int:
    if not args.model.is_file():
        raise UsageError(f"{args.model}: no such ONNX file; give the decoder's model.onnx (an "
                         "artifact directory's, or one exported elsewhere)")
    if args.output is not None and not args.output.parent.is_dir():
        raise UsageError(f"--output {args.output}: its directory {args.output.parent} does not "
                         "exist; create it first")
    try:
        from slmedge.exporter.passes import fuse_onnx_file
    except ImportError as e:
        raise MissingDependency(
            f"slmedge fuse needs the [export] extra ({e.name or e} is not installed): "
            "pip install 'slmedge[export]'"
        ) from None
    options = _options(args)
    report = fuse_onnx_file(args.model, args.output, options)
    written = args.output or args.model
    if args.json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
    else:
        for name, count in report.counts.items():
            why = f"  ({'; '.join(report.notes[name])})" if not count and report.notes.get(name) \
                else ""
            print(f"{name:32s} {count:4d}{why}")
        print(f"{report.ops_before} -> {report.ops_after} nodes")
    print(f"wrote {written}", file=sys.stderr)
    return EXIT_OK


def register(sub) -> None:
    p = sub.add_parser("fuse", help="fuse any decoder ONNX file (GQA attention, rotary, norms, "
                       "GELU) for ONNX Runtime's CPU provider", epilog=EXIT_CODES_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=__doc__)
    p.add_argument("model", type=Path, help="the decoder's ONNX file")
    p.add_argument("-o", "--output", type=Path, help="write here (default: overwrite MODEL)")
    p.add_argument("--config", type=Path, help="HF config.json (default: the one beside MODEL)")
    p.add_argument("--max-sequence-length", type=int, help="override the config's")
    p.add_argument("--no-logits-to-keep", action="store_true", help="do not add logits_to_keep")
    p.add_argument("--json", action="store_true",
                   help="print the fusion report (count and notes per fusion) as one JSON document")
    p.set_defaults(func=cmd_fuse)
