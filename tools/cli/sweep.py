"""``slmedge sweep sweep.yaml [--ray auto|ADDRESS] [--json]``: models x recipes x profiles
(exporter/sweep.py), each finished cell kept in the results store; prints the Pareto picks."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time

from slmedge.runtimes.errors import EXIT_CODES_HELP, EXIT_OK


def cmd_sweep(args) -> int:
    from slmedge.exporter.sweep import run_sweep

    from slmedge.tools.cli.results import open_store_or_notice

    # SIGTERM (a CI job cancelled, `kill`): stop like Ctrl-C, so the workers are stopped too;
    # finished cells are on disk already, a re-run resumes from them
    def _term(_sig, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    store = open_store_or_notice(args)
    t0 = time.monotonic()

    def say(message: str) -> None:
        print(f"[{time.monotonic() - t0:7.1f}s] {message}", file=sys.stderr, flush=True)

    def on_cell(doc: dict) -> None:
        if store is not None:
            store.add("sweep-cell", doc)

    try:
        summary = run_sweep(args.sweep, ray=args.ray, say=say, on_cell=on_cell)
    finally:
        if store is not None:
            store.close()
    if args.json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        return EXIT_OK
    for c in summary["cells"]:
        print(f"{c['cell']:40s} {c['status']:12s} size {c['size_mb'] or 0:9.2f} MB  ppl "
              f"{c['perplexity'] or 0:9.3f}  decode {c['decode_tokens_per_s'] or 0:8.1f} tok/s")
    for profile, entry in summary["pareto"].items():
        print(f"\nprofile {profile}: pick {entry['pick'] or '(none)'}")
        if entry["why"]:
            print(f"  why: {entry['why']}")
    print(f"\n{len(summary['computed'])} computed, {len(summary['cached'])} cached; "
          f"{summary['output']}/sweep.json", file=sys.stderr)
    return EXIT_OK


def register(sub) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("sweep", help="models x recipes x profiles: export, quantize, quality, "
                       "bench, Pareto pick (cached, resumable)", epilog=EXIT_CODES_HELP,
                       formatter_class=fmt,
                       description="Run the cells of a sweep file that are not done yet (a cell "
                                   "is keyed by its inputs: source hash, recipe, profile, "
                                   "settings, slmedge version), on a local process pool or on "
                                   "Ray. See README 'Sweeps'.")
    p.add_argument("sweep", help="sweep file (YAML)")
    p.add_argument("--ray", metavar="auto|ADDRESS|local",
                   help="run the tasks on Ray: auto = the running cluster (ray start --head), "
                        "ADDRESS = host:port of one, local = start one in this process "
                        "(needs the [sweep] extra)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON document")
    from slmedge.tools.cli.results import add_store_flags

    add_store_flags(p)
    p.set_defaults(func=cmd_sweep)
