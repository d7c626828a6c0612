"""RSS after load and decode speed of artifacts, each `slmedge bench` in its own process,
the artifacts alternating round after round (issue 15, "Runtime memory").

    python tools/bench/bench_rss_after_load.py --rounds 3 \\
        --artifact before=/tmp/gemma-int4-one-file --artifact after=/tmp/gemma-int4 \\
        --json tools/bench/results/bench_rss_after_load.json

``--source NAME=COMMIT`` runs artifact NAME's bench with the slmedge packages committed at
COMMIT (``git archive`` unpacked under ``--workdir``, as ``bench_scale.py`` does), the others
with the working tree: the same artifact twice compares two trees' runtimes, e.g. ::

    --artifact before=DIR --artifact after=DIR --source before=HEAD~1

Per run: the bench JSON's ``rss_before_load_mb``, ``rss_after_load_mb``, ``peak_rss_mb``
(this process's own, from the OS: not affected by the machine's load), the artifact's model
files' size, decode tok/s and the load average before the run (the machine is shared: seconds
are inflated by it, ratios between artifacts come from the same rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

SLMEDGE = Path(sys.executable).with_name("slmedge")


def model_mb(artifact: Path) -> float:
    return sum(p.stat().st_size for p in artifact.glob("model.onnx*")) / 1e6


def bench(artifact: Path, args, env: dict | None = None) -> dict:
    load = os.getloadavg()
    # the working tree's console script, or a snapshot's packages first on PYTHONPATH
    command = [str(SLMEDGE)] if env is None else [sys.executable, "-m", "slmedge.tools.cli"]
    done = subprocess.run(
        [*command, "bench", str(artifact), "--json", "--no-record", "--no-store",
         "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
         "--repeats", str(args.repeats), "--warmup", "1", "--threads", str(args.threads)],
        capture_output=True, text=True, check=True, env=env)
    d = json.loads(done.stdout)
    return {"file_mb": round(model_mb(artifact), 1),
            "rss_before_load_mb": d["rss_before_load_mb"],
            "rss_after_load_mb": d["rss_after_load_mb"],
            "over_file_mb": round(d["rss_after_load_mb"] - model_mb(artifact), 1),
            "peak_rss_mb": d["peak_rss_mb"], "decode_tokens_per_s": d["decode_tokens_per_s"],
            "load_avg_before": [round(x, 2) for x in load]}


# One session in a fresh process, created as the runtime creates it (make_session: the C heap's
# freed pages and the mapped weights' pages released), without the artifact's manifest checks:
# a graph rewritten by hand for a probe (tables stored, external data) loads too.
_SESSION_PROBE = """
import json, sys
def status():
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) * 1024 / 1e6 for k, v in (line.split(":", 1) for line in f)
                if k in ("VmRSS", "RssAnon", "RssFile")}
import numpy, onnxruntime
from slmedge.runtimes.sessions.onnx_decoder import make_session
before = status()
session = make_session(sys.argv[1], threads=2)
after = status()
print(json.dumps({"before_mb": before, "after_mb": after,
                  "session_mb": {k: round(after[k] - before[k], 1) for k in after}}))
"""


def session_probe(model: Path) -> dict:
    """RSS (MB, 10^6 bytes) of the session alone: ``VmRSS``/``RssAnon``/``RssFile`` after
    importing numpy and onnxruntime, and after the session is made."""
    load = os.getloadavg()
    done = subprocess.run([sys.executable, "-c", _SESSION_PROBE, str(model)], capture_output=True,
                          text=True, check=True)
    d = json.loads(done.stdout.strip().splitlines()[-1])
    files = model.parent.glob(model.name + "*")
    d["file_mb"] = round(sum(p.stat().st_size for p in files) / 1e6, 1)
    d["session_over_file_mb"] = round(d["session_mb"]["VmRSS"] - d["file_mb"], 1)
    d["load_avg_before"] = [round(x, 2) for x in load]
    return d


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact", action="append", default=[], help="NAME=DIR")
    p.add_argument("--session", action="append", default=[], metavar="NAME=MODEL.onnx",
                   help="instead of artifacts: the session alone (MB over numpy + onnxruntime "
                   "imported; RssAnon / RssFile), one fresh process per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--source", action="append", default=[], metavar="NAME=COMMIT",
                   help="bench artifact NAME with the slmedge packages committed at COMMIT")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bench_rss_after_load"),
                   help="where --source snapshots are unpacked")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.session:
        models = dict(a.split("=", 1) for a in args.session)
        probes = {name: [] for name in models}
        for r in range(args.rounds):
            for name, path in models.items():
                probes[name].append(session_probe(Path(path)))
                print(name, r, probes[name][-1], file=sys.stderr)
        doc = {"sessions": models, "config": vars(args) | {"json": str(args.json)},
               "summary": {name: {"file_mb": rs[0]["file_mb"],
                                  "session_mb_median": statistics.median(
                                      x["session_mb"]["VmRSS"] for x in rs),
                                  "session_over_file_mb_median": statistics.median(
                                      x["session_over_file_mb"] for x in rs)}
                           for name, rs in probes.items()},
               "runs": probes}
        text = json.dumps(doc, indent=1, default=str)
        if args.json:
            args.json.write_text(text + "\n")
        print(text)
        return
    if not args.artifact:
        p.error("--artifact NAME=DIR (or --session NAME=MODEL.onnx) is required")
    arts = dict(a.split("=", 1) for a in args.artifact)
    envs, commits = {}, {}
    for spec in args.source:
        name, commit = spec.split("=", 1)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_scale import snapshot_env, source_snapshot

        commits[name], root = source_snapshot(commit, args.workdir)
        envs[name] = snapshot_env(root)
    runs = {name: [] for name in arts}
    for r in range(args.rounds):
        for name, path in arts.items():
            runs[name].append(bench(Path(path), args, envs.get(name)))
            print(name, r, runs[name][-1], file=sys.stderr)
    summary = {name: {"rss_after_load_mb_median": statistics.median(x["rss_after_load_mb"] for x in rs),
                      "decode_tokens_per_s_median": statistics.median(x["decode_tokens_per_s"] for x in rs),
                      "file_mb": rs[0]["file_mb"]} for name, rs in runs.items()}
    first = next(iter(arts))
    for name in arts:
        summary[name]["decode_ratio_vs_" + first] = round(
            summary[name]["decode_tokens_per_s_median"] / summary[first]["decode_tokens_per_s_median"], 3)
    doc = {"artifacts": arts, "sources": commits or None,
           "config": vars(args) | {"json": str(args.json)},
           "summary": summary, "runs": runs}
    text = json.dumps(doc, indent=1, default=str)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
