"""The results store in the CLI: ``slmedge results``, ``--store`` / ``--no-store`` on the
commands that write results, ``slmedge report --from-store``, and ``slmedge compare
--baseline A.json CANDIDATE.json --fail-on-regression PCT`` (exit 1 on a regression).

Registered through ``COMMAND_MODULES`` in ``tools/cli/app.py`` after ``cli_runner``: it adds flags
to the ``bench`` / ``export`` / ``quantize`` / ``compare`` / ``report`` parsers and takes over
``compare`` and ``report`` (which still call ``cli_runner`` / ``report`` for the rendering).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from slmedge.runtimes.errors import EXIT_CODES_HELP, EXIT_ERROR, EXIT_OK, UsageError

#: What a regression is, per figure: (name, how to read it, higher is better?)
REGRESSION_FIGURES = (
    ("decode_tokens_per_s", "decode tok/s", True),
    ("prefill_tokens_per_s", "prefill tok/s", True),
    ("ttft_ms", "TTFT ms", False),
    ("decode_ms_p50", "decode latency p50 ms", False),
    ("decode_ms_p99", "decode latency p99 ms", False),
)


def add_store_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("results store")
    g.add_argument("--store", metavar="PATH", help="SQLite results store to write to (default: "
                   "$SLMEDGE_RESULTS, else ~/.cache/slmedge/results.sqlite)")
    g.add_argument("--no-store", action="store_true", help="do not write to the results store")


def open_store_for(args, write: bool = True):
    """The store the flags name, or None with ``--no-store`` (for writing)."""
    from slmedge.runtimes.bench.results_store import ResultsStore

    if write and getattr(args, "no_store", False):
        return None
    return ResultsStore(getattr(args, "store", None))


def _manifest_of(artifact) -> dict | None:
    try:
        return json.loads((Path(artifact) / "manifest.json").read_text())
    except (OSError, ValueError, TypeError):
        return None


def open_store_or_notice(args):
    """The store for writing, or None (``--no-store``, or it cannot be opened: a notice, since
    the measurement itself succeeded and is printed / written anyway)."""
    try:
        return open_store_for(args)
    except UsageError as e:
        print(f"notice: not stored: {e}", file=sys.stderr)
        return None


def store_bench(args, result: dict, artifact=None) -> None:
    """Keep a bench result (``slmedge bench``) in the store; say where on stderr."""
    store = open_store_or_notice(args)
    if store is None:
        return
    with store:
        store.add_bench(result, _manifest_of(artifact or getattr(args, "artifact", None)))
    print(f"stored in {store.path}", file=sys.stderr)


def store_quality(args, manifest: dict, artifact) -> None:
    """Keep an export's / quantization's quality card in the store."""
    if not manifest.get("quality"):
        return
    store = open_store_or_notice(args)
    if store is None:
        return
    with store:
        store.add_quality(manifest, str(artifact))
    print(f"quality card stored in {store.path}", file=sys.stderr)


def _filters(args) -> dict:
    return {"model": args.model, "recipe": args.recipe, "device": args.device,
            "since": args.since, "until": args.until}


def add_filter_flags(p: argparse.ArgumentParser, prefix: str = "") -> None:
    g = p.add_argument_group("store filters")
    g.add_argument("--model", help="source model name contains this (case-insensitive)")
    g.add_argument("--recipe", help="recipe (quantization label or dtype) contains this")
    g.add_argument("--device", help="device name or target contains this")
    g.add_argument("--since", help="measured on or after this date/time (YYYY-MM-DD[THH:MM])")
    g.add_argument("--until", help="measured on or before this date/time (a date: that whole day)")


# -- slmedge results ----------------------------------------------------------------------


def cmd_results(args) -> int:
    store = open_store_for(args, write=False)
    with store:
        rows = store.query(kind=args.kind, **_filters(args), limit=args.limit)
    if args.json:
        doc = {"store": str(store.path), "count": len(rows),
               "rows": [dict(r.summary(), doc=r.doc) if args.full else r.summary()
                        for r in rows]}
        sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
        return EXIT_OK
    head = ("id", "kind", "measured", "model", "recipe", "device", "status", "tok/s", "TTFT ms",
            "size MB", "ppl")
    table = [head]
    for r in rows:
        table.append((str(r.id), r.kind, (r.measured_at or r.stored_at)[:19], r.model or "-",
                      r.recipe or "-", r.device or "-", r.status or "-",
                      _fmt(r.decode_tokens_per_s), _fmt(r.ttft_ms), _fmt(r.model_size_mb),
                      _fmt(r.perplexity, 3)))
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    print(f"{len(rows)} row(s) in {store.path}", file=sys.stderr)
    return EXIT_OK


def _fmt(x, nd=1) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


# -- reading bench documents (files, fleet documents, the store) ---------------------------


def load_documents(specs: list[str]):
    """``[LABEL=]FILE.json`` -> (validated results, failure lines). A fleet document
    (``slmedge bench --fleet -o merged.json``) gives its per-device results and errors."""
    from slmedge.runtimes.bench.schema import validate_result
    from slmedge.runtimes.bench.fleet import is_fleet_document

    results, failures = [], []
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or Path(spec).exists():
            label, path = None, spec
        try:
            doc = json.loads(Path(path).read_text())
        except OSError as e:
            raise UsageError(f"cannot read {path}: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise UsageError(f"{path} is not JSON ({e})") from None
        if is_fleet_document(doc):
            for i, r in enumerate(doc.get("results", [])):
                results.append(validate_result(r, f"{path}: results[{i}]"))
            failures += [e["message"] for e in doc.get("errors", [])]
            continue
        r = validate_result(doc, path)
        if label:
            r = r.model_copy(update={"label": label})
        results.append(r)
    return results, failures


def store_results(args):
    """Bench results (and fleet failures) from the store, with the filter flags."""
    from slmedge.runtimes.bench.schema import validate_result

    with open_store_for(args, write=False) as store:
        rows = store.query(**_filters(args))
    results = [validate_result(r.doc, f"store row {r.id}") for r in rows if r.kind == "bench"]
    failures = [r.doc.get("message", "") for r in rows if r.kind == "fleet-error"]
    return results, failures


def cmd_report(args) -> int:
    from .report import render_html, render_markdown

    results, failures = load_documents(args.results)
    if args.from_store:
        more, more_failures = store_results(args)
        results += more
        failures += more_failures
    if not results:
        raise UsageError("slmedge report: no results to draw; give bench JSON files, or "
                         "--from-store with filters that match (slmedge results lists them)")
    fmt = args.format or ("markdown" if args.output and str(args.output).endswith(".md")
                          else "html")
    text = (render_html(results, args.title, failures=failures) if fmt == "html"
            else render_markdown(results, args.title, failures=failures))
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"wrote {args.output} ({fmt}, {len(results)} result(s))", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return EXIT_OK


# -- slmedge compare --baseline ... --fail-on-regression PCT -------------------------------


def regressions(baseline, candidate, pct: float) -> list[dict]:
    """Figures of ``candidate`` worse than ``baseline`` by more than ``pct`` percent."""
    found = []
    for key, name, higher_better in REGRESSION_FIGURES:
        base, cand = getattr(baseline, key), getattr(candidate, key)
        if not base or cand is None:
            continue
        change = (cand - base) / base * 100
        worse = -change if higher_better else change
        if worse > pct:
            found.append({"figure": key, "name": name, "baseline": base, "candidate": cand,
                          "change_pct": round(change, 2), "threshold_pct": pct,
                          "candidate_label": candidate.label})
    return found


def cmd_compare(args) -> int:
    from slmedge.tools.cli import runner as cli_runner
    from .report import compare_document, format_compare

    if args.baseline is None and args.fail_on_regression is None:
        return cli_runner.cmd_compare(args)
    if args.baseline is None:
        raise UsageError("--fail-on-regression needs --baseline BASELINE.json")
    if args.fail_on_regression is not None and args.fail_on_regression < 0:
        raise UsageError(f"--fail-on-regression must be >= 0 percent, got "
                         f"{args.fail_on_regression}")
    base, _ = load_documents([args.baseline])
    cands, _ = load_documents(args.results)
    if len(base) != 1:
        raise UsageError(f"--baseline {args.baseline}: holds {len(base)} results; give one")
    baseline = base[0]
    pct = args.fail_on_regression
    found = [x for c in cands for x in regressions(baseline, c, pct)] if pct is not None else []
    if args.json:
        doc = compare_document([baseline, *cands])
        doc["gate"] = {"threshold_pct": pct, "regressions": found,
                       "passed": not found}
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        print(format_compare([baseline, *cands], markdown=args.format == "markdown"))
        if pct is not None:
            for x in found:
                print(f"REGRESSION: {x['candidate_label']}: {x['name']} {x['baseline']:.4g} -> "
                      f"{x['candidate']:.4g} ({x['change_pct']:+.1f}%, limit {pct:g}%)")
            if not found:
                print(f"no regression beyond {pct:g}% against {args.baseline}")
    if found:
        print(f"slmedge compare: {len(found)} figure(s) regressed beyond {pct:g}% against "
              f"{args.baseline}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def register(sub) -> None:
    """Add ``results``; store flags on the writing commands; the gate on ``compare``."""
    fmt = argparse.RawDescriptionHelpFormatter
    for name in ("bench", "export", "quantize"):
        if name in sub.choices:
            add_store_flags(sub.choices[name])

    if "compare" in sub.choices:
        p = sub.choices["compare"]
        g = p.add_argument_group("regression gate (for CI)")
        g.add_argument("--baseline", metavar="BASELINE.json",
                       help="compare every RUN.json against this result")
        g.add_argument("--fail-on-regression", type=float, metavar="PCT",
                       help="exit 1 when decode/prefill tok/s drop, or TTFT / decode latency "
                            "rise, by more than PCT percent against --baseline")
        p.set_defaults(func=cmd_compare)

    if "report" in sub.choices:
        p = sub.choices["report"]
        p.add_argument("--from-store", action="store_true",
                       help="also draw the bench results of the results store that match the "
                            "filters below (fleet failures included)")
        p.add_argument("--store", metavar="PATH", help="results store to read (default: "
                       "$SLMEDGE_RESULTS, else ~/.cache/slmedge/results.sqlite)")
        add_filter_flags(p)
        p.set_defaults(func=cmd_report)

    p = sub.add_parser("results", help="query the results store (bench, quality, sweep cells)",
                       epilog=EXIT_CODES_HELP, formatter_class=fmt,
                       description="List what the results store holds, oldest first. Every "
                                   "slmedge bench / export / quantize / sweep writes there "
                                   "unless --no-store.")
    p.add_argument("--store", metavar="PATH", help="results store (default: $SLMEDGE_RESULTS, "
                   "else ~/.cache/slmedge/results.sqlite)")
    p.add_argument("--kind", choices=["bench", "quality", "sweep-cell", "fleet-error"])
    add_filter_flags(p)
    p.add_argument("--limit", type=int, help="at most N rows")
    p.add_argument("--json", action="store_true", help="one JSON document")
    p.add_argument("--full", action="store_true", help="with --json: each row's whole document")
    p.set_defaults(func=cmd_results)
