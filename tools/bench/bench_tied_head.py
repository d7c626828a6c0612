"""RSS after load and decode speed of a tied fp32 head in its two forms (issue 15).

    python tools/bench/bench_tied_head.py OLD_ARTIFACT NEW_ARTIFACT [--rounds 3] [--tokens 64]
        [--json tools/bench/results/bench_tied_head_smollm2.json]

OLD: the table ``[V, K]`` read by the embedding Gather and by ``MatMul(h, Transpose(W))``;
NEW: the same artifact after ``passes.tied_head.TiedHeadOnce`` (one ``[1, K, V]`` table).
Each measurement is a fresh process (CPU provider, 2 threads): RSS after opening the decoder
(the bench's ``rss_after_load_mb``), then a 16-token prompt and ``--tokens`` greedy
single-token steps (decode tokens/s) and the greedy tokens, so the two forms can be compared
token for token. The forms alternate within each round; the load average is recorded (the
machine is shared: wall times are inflated, RSS is each process's own).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

_CHILD = r"""
import json, sys, time
import numpy as np
from slmedge.runtimes.artifact import open_artifact
from slmedge.runtimes.bench.runner import rss_mb
from slmedge.runtimes.sessions.static_decoder import open_decoder
artifact = open_artifact(sys.argv[1])
tokens = int(sys.argv[2])
before = rss_mb()
decoder = open_decoder(artifact, threads=2)
after = rss_mb()
prompt = [int(t) for t in np.random.default_rng(0).integers(100, 40000, size=16)]
logits = decoder.step(prompt)
out = [int(np.argmax(logits))]
t = time.perf_counter()
for _ in range(tokens - 1):
    out.append(int(np.argmax(decoder.step([out[-1]]))))
seconds = time.perf_counter() - t
print(json.dumps({"rss_before_mb": round(before, 1), "rss_after_load_mb": round(after, 1),
                  "file_mb": round(artifact.model_path.stat().st_size / 1e6, 1),
                  "decode_tok_s": round((tokens - 1) / seconds, 2), "tokens": out}))
"""


def measure(artifact: str, tokens: int) -> dict:
    done = subprocess.run([sys.executable, "-c", _CHILD, artifact, str(tokens)],
                          capture_output=True, text=True, timeout=900)
    if done.returncode:
        raise SystemExit(f"measuring {artifact} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    loads = [os.getloadavg()]
    for r in range(args.rounds):
        order = ("old", "new") if r % 2 == 0 else ("new", "old")
        for form in order:
            runs[form].append(measure(getattr(args, form), args.tokens))
            print(form, {k: v for k, v in runs[form][-1].items() if k != "tokens"}, file=sys.stderr)
        loads.append(os.getloadavg())
    summary = {}
    for form, rows in runs.items():
        summary[form] = {
            "artifact": getattr(args, form),
            "file_mb": rows[0]["file_mb"],
            "rss_after_load_mb": [r["rss_after_load_mb"] for r in rows],
            "over_file_mb_median": round(statistics.median(r["rss_after_load_mb"] for r in rows)
                                         - rows[0]["file_mb"], 1),
            "decode_tok_s": [r["decode_tok_s"] for r in rows],
            "decode_tok_s_median": statistics.median(r["decode_tok_s"] for r in rows),
        }
    result = {
        "what": "tied fp32 lm_head: [V,K] table + Transpose (old) vs one [1,K,V] table (new)",
        "rounds": args.rounds, "decode_tokens": args.tokens, "threads": 2,
        "forms": summary,
        "decode_ratio_new_over_old": round(summary["new"]["decode_tok_s_median"]
                                           / summary["old"]["decode_tok_s_median"], 3),
        "same_greedy_tokens": all(a["tokens"] == b["tokens"] for a, b in zip(runs["old"], runs["new"])),
        "load_average": [[round(x, 2) for x in la] for la in loads],
    }
    text = json.dumps(result, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
