"""``slmedge bench ARTIFACT... --fleet fleet.yaml [--tags pi] [--json] [-o merged.json]``.

Thin: flags -> ``runtimes.bench.fleet.run_fleet`` -> one merged document (stdout with ``--json``,
``-o``), a per-device table, the results store. Progress: one line per event and device on
stderr (``[pi5-kitchen] round 1/3 ...``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from slmedge.runtimes.errors import EXIT_ERROR, EXIT_OK, UsageError


def _say_factory(stream=None):
    stream = stream or sys.stderr
    t0 = time.monotonic()

    def say(device: str, message: str) -> None:
        stream.write(f"[{time.monotonic() - t0:7.1f}s] [{device}] {message}\n")
        stream.flush()

    return say


def fleet_table(merged: dict) -> str:
    """One row per device x artifact: status, decode tok/s, TTFT, peak RSS (or the error)."""
    lines = ["| device | target | artifact | status | decode tok/s | TTFT ms | peak RSS MB |",
             "| --- | --- | --- | --- | ---: | ---: | ---: |"]
    by_device = {d["name"]: d for d in merged["devices"]}
    for r in merged["results"]:
        d = by_device.get(r.get("device"), {})
        lines.append(f"| {r.get('device')} | {d.get('target', r.get('target'))} | {r['label']} | "
                     f"{r['status']} | {r.get('decode_tokens_per_s') or 0:.1f} | "
                     f"{r.get('ttft_ms') or 0:.1f} | {r.get('peak_rss_mb') or 0:.0f} |")
    for e in merged["errors"]:
        lines.append(f"| {e['device']} | {e['target']} | {Path(e['artifact']).name} | failed | "
                     f"- | - | - |")
    out = "\n".join(lines)
    for e in merged["errors"]:
        out += f"\nerror: {e['message']}"
    return out


def cmd_bench_fleet(args, config) -> int:
    """Run the benchmark config on every (selected) device of ``--fleet``."""
    from slmedge.device_profiles import session_kwargs
    from slmedge.runtimes.bench.fleet import load_fleet, run_fleet

    if getattr(args, "target", None):
        raise UsageError("--fleet and --target exclude each other: the fleet file names the "
                         "targets")
    if getattr(args, "profile", None):
        raise UsageError("--fleet takes each device's profile from the fleet file "
                         "(devices: - profile: NAME); drop --profile")
    fleet = load_fleet(args.fleet)
    tags = [t for spec in (args.tags or []) for t in spec.split(",") if t.strip()]
    artifacts = [args.artifact, *(args.more_artifacts or [])]
    for a in artifacts:
        if not Path(a).is_dir():
            raise UsageError(f"artifact {a}: no such directory (slmedge export writes one)")
    if args.device_timeout:
        fleet = fleet.model_copy(update={"timeout_s": args.device_timeout})
    merged = run_fleet(fleet, artifacts, config, tags=tags, progress=_say_factory(),
                       fleet_path=str(args.fleet), session_kwargs=session_kwargs)
    if args.output:
        Path(args.output).write_text(json.dumps(merged, indent=2) + "\n")
        print(f"wrote {args.output}", file=sys.stderr)
    from slmedge.tools.cli.results import open_store_or_notice

    store = open_store_or_notice(args)
    if store is not None:
        with store:
            manifests = {}
            for r in merged["results"]:
                art = artifacts[[Path(a).resolve().name for a in artifacts].index(r["label"])] \
                    if r["label"] in [Path(a).resolve().name for a in artifacts] else None
                if art and art not in manifests:
                    from slmedge.tools.cli.results import _manifest_of

                    manifests[art] = _manifest_of(art)
                store.add_bench(r, manifests.get(art))
            for e in merged["errors"]:
                store.add("fleet-error", dict(e, started_at=merged["started_at"]),
                          device=e["device"], target=e["target"], artifact=e["artifact"],
                          status="failed", measured_at=merged["started_at"])
        print(f"stored in {store.path}", file=sys.stderr)
    if args.json:
        sys.stdout.write(json.dumps(merged, indent=2) + "\n")
    else:
        print(fleet_table(merged))
    ok = sum(1 for d in merged["devices"] if d["status"] == "ok")
    print(f"fleet: {ok} of {len(merged['devices'])} device(s) complete, "
          f"{len(merged['errors'])} error(s), {merged['wall_s']:.1f} s", file=sys.stderr)
    return EXIT_ERROR if merged["errors"] else EXIT_OK


def register(sub) -> None:
    """Add the fleet flags to ``slmedge bench`` (the parser lives in tools/cli/app.py)."""
    if "bench" not in sub.choices:
        return
    p = sub.choices["bench"]
    p.add_argument("more_artifacts", nargs="*", metavar="ARTIFACT",
                   help="more artifacts (with --fleet: each is benched on every device)")
    g = p.add_argument_group("fleet")
    g.add_argument("--fleet", metavar="FLEET.yaml",
                   help="bench on every device of this fleet file, concurrently (one bench at "
                        "a time per device); see README 'Device fleets'")
    g.add_argument("--tags", action="append", metavar="TAG[,TAG]",
                   help="with --fleet: only devices carrying one of these tags")
    g.add_argument("--device-timeout", type=float, metavar="SECONDS",
                   help="with --fleet: time limit per device (overrides the file's timeout_s)")
