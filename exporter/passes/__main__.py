"""``python -m slmedge.exporter.passes MODEL.onnx [-o OUT.onnx]``: fuse any decoder ONNX file.

Reads ``config.json`` beside the model (max length, sliding windows) unless ``--config``
names one; prints the fusion report (counts per fusion) as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .pipeline import FusionOptions, fuse_onnx_file


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m slmedge.exporter.passes", description=__doc__)
    p.add_argument("model", type=Path)
    p.add_argument("-o", "--output", type=Path, help="default: overwrite MODEL")
    p.add_argument("--config", type=Path, help="HF config.json (default: beside MODEL)")
    p.add_argument("--max-sequence-length", type=int, help="override the config's")
    p.add_argument("--no-logits-to-keep", action="store_true", help="do not add logits_to_keep")
    args = p.parse_args(argv)
    config = args.config or args.model.parent / "config.json"
    options = FusionOptions.from_hf_config(json.loads(config.read_text())) if config.exists() \
        else FusionOptions()
    if args.max_sequence_length:
        options.max_sequence_length = args.max_sequence_length
    options.logits_to_keep = not args.no_logits_to_keep
    report = fuse_onnx_file(args.model, args.output, options)
    json.dump(report.to_dict(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
