"""``slmedge profiles list|show`` and ``slmedge check``: device profiles on the command line.

Registered through ``COMMAND_MODULES`` in ``tools/cli/app.py``; thin: flags -> library call.
"""

from __future__ import annotations

import json
import sys

from slmedge.runtimes.errors import EXIT_CODES_HELP, EXIT_OK, EXIT_UNSUPPORTED


def _print_json(doc) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    sys.stdout.flush()


def cmd_profiles_list(args) -> int:
    from slmedge.device_profiles import load_builtin_profiles, profile_summary

    rows = [profile_summary(p) for p in load_builtin_profiles()]
    if args.json:
        _print_json(rows)
        return EXIT_OK
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        providers = " > ".join(p.replace("ExecutionProvider", "") for p in r["providers"])
        target = f"{r['os']}/{r['arch']}"
        print(f"{r['name']:<{width}}  {target:<14} {providers:<13} "
              f"{r['shapes']:<7} {r['recipe']:<11} {'+'.join(r['formats']):<8} {r['description']}")
    print("\nshow one: slmedge profiles show NAME; write your own: a YAML file with "
          "'extends: NAME', passed as --profile FILE.yaml", file=sys.stderr)
    return EXIT_OK


def cmd_profiles_show(args) -> int:
    from slmedge.device_profiles import load_profile

    profile = load_profile(args.name)
    doc = profile.model_dump(mode="json", exclude_none=True)
    if args.json:
        _print_json(doc)
    else:
        import yaml

        sys.stdout.write(yaml.safe_dump(doc, sort_keys=False))
    return EXIT_OK


def _format_table(report, max_rows: int) -> str:
    lines = [f"profile {report.profile} -> {report.target}"]
    for g in report.graphs:
        if g.error:
            lines.append(f"  {g.file}: not placed: {g.error}")
            continue
        cover = f"{g.target_nodes}/{g.total_nodes} nodes ({g.coverage:.0%})" \
            if g.coverage is not None else f"{g.total_nodes} nodes"
        parts = f", {g.partitions} partitions" if g.partitions is not None else ""
        lines.append(f"  {g.file}: {cover}{parts} [{g.method}]")
    if report.rows:
        lines.append("")
        lines.append("op counts: " + ", ".join(f"{op} x{n}" for op, n in report.ops.items()))
        w_graph = max(len(r.graph) for r in report.rows)
        w_node = min(40, max(len(r.node) for r in report.rows))
        w_op = max(len(r.op) for r in report.rows)
        lines.append(f"{'graph':<{w_graph}}  {'node':<{w_node}}  {'op':<{w_op}}  reason")
        for r in report.rows[:max_rows]:
            lines.append(f"{r.graph:<{w_graph}}  {r.node[:w_node]:<{w_node}}  {r.op:<{w_op}}  "
                         f"{r.reason}")
        if len(report.rows) > max_rows:
            lines.append(f"... {len(report.rows) - max_rows} more rows (--max-rows, or --json)")
    else:
        lines.append("every node runs where the profile wants it")
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


def cmd_check(args) -> int:
    from slmedge.device_profiles import load_profile
    from slmedge.runtimes.check.placement import check_artifact

    if getattr(args, "target", None):  # the quality card replayed on a device: cli_target_card
        from slmedge.tools.cli.target_card import cmd_check_target

        return cmd_check_target(args)
    if not args.profile:
        from slmedge.runtimes.errors import UsageError

        raise UsageError("slmedge check needs --profile NAME (where nodes would run) or "
                         "--target ssh://user@host (replay the quality card there)")
    profile = load_profile(args.profile)
    report = check_artifact(args.artifact, profile, context=args.context)
    if args.json:
        _print_json(report.to_dict())
    else:
        print(_format_table(report, args.max_rows))
    if args.strict and not report.fully_placed:
        print(f"slmedge check: {len(report.rows)} nodes would not run on {report.target} "
              "(--strict)", file=sys.stderr)
        return EXIT_UNSUPPORTED
    if args.strict and not report.fits_memory:
        print("slmedge check: the artifact does not fit the profile's memory budget (--strict)",
              file=sys.stderr)
        return EXIT_UNSUPPORTED
    return EXIT_OK


def memory_gate(args, artifact: str, profile_name: str | None) -> int | None:
    """``bench`` / ``bundle`` with a profile: warn on stderr when weights + KV cache exceed the
    profile's ``device.ram_budget_mb``; with ``--strict`` return exit 4 (before any work)."""
    if not profile_name:
        return None
    from slmedge.device_profiles import load_profile
    from slmedge.runtimes.check.memory_budget import check_memory

    estimate = check_memory(artifact, load_profile(profile_name),
                            context=getattr(args, "context", None))
    if estimate.fits:
        return None
    strict = getattr(args, "strict", False)
    print(f"{'error' if strict else 'warning'}: {estimate.message()}"
          + (" (--strict)" if strict else ""), file=sys.stderr)
    return EXIT_UNSUPPORTED if strict else None


def register(sub) -> None:
    """Add ``profiles`` and ``check`` to the ``slmedge`` parser."""
    import argparse

    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("profiles", help="list or show device profiles",
                       epilog=EXIT_CODES_HELP, formatter_class=fmt)
    psub = p.add_subparsers(dest="profiles_command", metavar="ACTION", required=True)
    q = psub.add_parser("list", help="the built-in profiles")
    q.add_argument("--json", action="store_true", help="print one JSON document")
    q.set_defaults(func=cmd_profiles_list)
    q = psub.add_parser("show", help="one profile, fully resolved (YAML, or --json)")
    q.add_argument("name", help="built-in profile name or a YAML file")
    q.add_argument("--json", action="store_true", help="print one JSON document")
    q.set_defaults(func=cmd_profiles_show)

    p = sub.add_parser(
        "check", help="where an artifact's nodes would run on a profile's target (no device)",
        description="NNAPI/CoreML: ONNX Runtime's mobile usability checker; QNN: a session on "
        "the HTP backend of onnxruntime-qnn (an emulator on x86 Linux); CPU profiles: nodes "
        "without an optimized kernel. Prints one node / op / reason table.",
        epilog=EXIT_CODES_HELP, formatter_class=fmt)
    p.add_argument("artifact", help="artifact directory written by slmedge export")
    p.add_argument("--profile", help="built-in profile name or a YAML file")
    p.add_argument("--target", help="replay the artifact's quality card there (ssh://user@host"
                   "[:port] or adb://SERIAL): greedy tokens, perplexity window and KL against "
                   "the card recorded at export; --strict exits 3 outside the quality gate")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--max-rows", type=int, default=40, help="table rows to print (default 40)")
    p.add_argument("--strict", action="store_true",
                   help="exit 4 when any node would not run on the target, or when weights + "
                   "KV cache exceed the profile's device.ram_budget_mb")
    add_context_flag(p)
    p.set_defaults(func=cmd_check)


def add_context_flag(p) -> None:
    """``--context``: KV-cache tokens of the memory-budget check."""
    p.add_argument("--context", type=int, default=None, metavar="TOKENS",
                   help="KV-cache tokens for the memory-budget check (default: the profile's "
                   "static context_length, else 4096 capped by the model's maximum)")


def runtime_kwargs(args, threads: int | None = None) -> dict:
    """Session settings for a decoder from ``--profile`` / ``--strict``: the profile's
    providers (with options) and CPU-fallback rule; ``threads`` (from ``--threads``) wins
    over the profile's."""
    kwargs: dict = {"threads": threads}
    name = getattr(args, "profile", None)
    if name:  # the profiles' schema (pydantic) only then: a run imports what it needs
        from slmedge.device_profiles import load_profile

        profile = load_profile(name)
        kwargs["providers"] = profile.provider_specs()
        kwargs["allow_cpu_fallback"] = profile.runtime.allow_cpu_fallback
        if threads is None:
            kwargs["threads"] = profile.runtime.threads
    if getattr(args, "strict", False):
        kwargs["strict"] = True
    return kwargs


def bench_session_kwargs(args) -> dict:
    """``run_bench`` keywords from ``--profile`` / ``--strict`` (threads stay the bench's)."""
    kwargs = runtime_kwargs(args, threads=getattr(args, "threads", None))
    kwargs.pop("threads")
    return kwargs
