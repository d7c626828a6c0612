"""CLI of the benchmark runner: ``slmedge compare``, ``slmedge report``, and the parts of
``slmedge bench`` beyond the basic flags (buckets, depths, spread limit, ``--target``).

Registered through ``COMMAND_MODULES`` in ``tools/cli/app.py``; thin: flags -> library call.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from slmedge.runtimes.errors import EXIT_CODES_HELP, EXIT_OK


def _lengths(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated token counts, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"token counts must be >= 1, got {text!r}")
    return values


def add_bench_flags(p: argparse.ArgumentParser) -> None:
    """Measurement flags of ``slmedge bench`` (the basic ones live in tools/cli/app.py)."""
    g = p.add_argument_group("measurement")
    g.add_argument("--prompt-buckets", type=_lengths, default=None, metavar="N,N,...",
                   help="prompt lengths for TTFT (default 32,128,512; --prompt-tokens is added)")
    g.add_argument("--depths", type=_lengths, default=None, metavar="N,N,...",
                   help="context depths for decode latency (default 32,128,512)")
    g.add_argument("--depth-tokens", type=int, default=None,
                   help="decode steps timed at each depth other than --prompt-tokens (default 32)")
    g.add_argument("--max-spread", type=float, default=None,
                   help="run-to-run spread (max-min)/median above which a figure is flagged "
                        "unstable (default 0.10)")
    g.add_argument("--label", help="name of this variant in tables and reports "
                                   "(default: the artifact directory name)")


def bench_options(args) -> dict:
    """BenchConfig fields from the flags of :func:`add_bench_flags` that were given."""
    fields = {"prompt_buckets": getattr(args, "prompt_buckets", None),
              "decode_depths": getattr(args, "depths", None),
              "depth_tokens": getattr(args, "depth_tokens", None),
              "max_spread": getattr(args, "max_spread", None),
              "label": getattr(args, "label", None)}
    return {k: v for k, v in fields.items() if v is not None}


def run_on_target(args, config, say, *, providers=None, strict: bool = False,
                  allow_cpu_fallback: bool = True) -> dict:
    """``slmedge bench --target URL``: run on a Pi (ssh://) or a phone (adb://); the session
    options are those ``run_bench`` takes (e.g. from ``--profile`` / ``--strict``)."""
    from slmedge.runtimes.bench.remote import run_remote_bench

    # a lost connection keeps what was measured: in --output, else in a file named here
    partial = (getattr(args, "output", None)
               or f"slmedge-bench-partial-{time.strftime('%Y%m%d-%H%M%S')}.json")
    return run_remote_bench(args.target, args.artifact, config, providers=providers,
                            strict=strict, allow_cpu_fallback=allow_cpu_fallback, progress=say,
                            partial_path=partial)


def bench_text(result: dict) -> str:
    """The llama-bench style table of one result, with memory and warnings."""
    from slmedge.runtimes.bench.schema import validate_result

    from .report import bench_table, memory_table

    r = validate_result(result)
    lines = [bench_table([r]), "", memory_table([r])]
    lines += [f"warning: {w}" for w in r.warnings]
    return "\n".join(lines)


def _load(paths: list[str]):
    """Read ``[LABEL=]FILE.json`` arguments into validated results (label overrides)."""
    from slmedge.runtimes.bench.schema import load_result

    results = []
    for spec in paths:
        label, sep, path = spec.partition("=")
        if not sep or Path(spec).exists():
            label, path = None, spec
        r = load_result(path)
        if label:
            r = r.model_copy(update={"label": label})
        results.append(r)
    return results


def cmd_compare(args) -> int:
    from .report import compare_document, format_compare

    results = _load(args.results)
    if args.json:
        sys.stdout.write(json.dumps(compare_document(results), indent=2) + "\n")
    else:
        print(format_compare(results, markdown=args.format == "markdown"))
    return EXIT_OK


def cmd_report(args) -> int:
    from .report import render_html, render_markdown

    results = _load(args.results)
    fmt = args.format or ("markdown" if args.output and str(args.output).endswith(".md")
                          else "html")
    text = (render_html(results, args.title) if fmt == "html"
            else render_markdown(results, args.title))
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"wrote {args.output} ({fmt}, {len(results)} result(s))", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def register(sub) -> None:
    """Add ``compare`` and ``report``, and the measurement flags of ``bench``."""
    fmt = argparse.RawDescriptionHelpFormatter
    if "bench" in sub.choices:
        add_bench_flags(sub.choices["bench"])

    p = sub.add_parser("compare", help="bench results side by side, as ratios to the first",
                       epilog=EXIT_CODES_HELP, formatter_class=fmt,
                       description="Compare slmedge bench JSON files: every figure side by "
                                   "side with its ratio to the first file. ~ marks figures "
                                   "whose run-to-run spread was too wide to trust.")
    p.add_argument("results", nargs="+", metavar="[LABEL=]RUN.json")
    p.add_argument("--format", choices=["text", "markdown"], default="text")
    p.add_argument("--json", action="store_true", help="print the comparison as one JSON document")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("report", help="HTML (or Markdown) report with plots and tables",
                       epilog=EXIT_CODES_HELP, formatter_class=fmt,
                       description="Render bench results as one self-contained HTML page "
                                   "(inline SVG plots, no network) or as Markdown for a PR.")
    p.add_argument("results", nargs="*", metavar="[LABEL=]RUN.json")  # or --from-store
    p.add_argument("-o", "--output", help="write here (default: stdout)")
    p.add_argument("--format", choices=["html", "markdown"],
                   help="default: html, or markdown when -o ends in .md")
    p.add_argument("--title", default="slmedge benchmark report")
    p.set_defaults(func=cmd_report)

