"""Memory of a static export's StaticDecoder, with and without shared weights.

    python tools/bench/static_rss.py ARTIFACT... [--threads 2] [--tokens 64] [--decode 8]

Each measurement runs in a fresh process (CPU provider): RSS (VmRSS, split into anonymous
and file-backed pages) and PSS (file pages mapped twice count once) after loading the decoder,
and after a prompt of --tokens tokens and --decode single-token steps, as increases over the
process before the load (``base_mb``: Python, numpy, onnxruntime); with the prefill-chunk and
decode-step times. The README's figures for static exports come from this script.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

_CHILD = r"""
import json, sys, time
from pathlib import Path

def mem():
    out = {}
    for line in open("/proc/self/status"):
        key = line.split(":")[0]
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(line.split()[1]) / 1024
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("Pss:"):
            out["Pss"] = int(line.split()[1]) / 1024
    return out

root, share = Path(sys.argv[1]), sys.argv[2] == "1"
threads, tokens, decode = map(int, sys.argv[3:6])
import onnxruntime  # noqa: F401  (in the baseline, not in the load)
from slmedge.runtimes.sessions.static_decoder import StaticDecoder
static = json.loads((root / "manifest.json").read_text())["static"]
base = mem()
t = time.perf_counter()
decoder = StaticDecoder(root, static, threads=threads, share_weights=share)
load_s = time.perf_counter() - t
loaded = mem()
ids = [(7 * i) % 1000 + 1 for i in range(tokens)]
decoder.step(ids[:decoder.chunk])  # warm-up chunk
decoder.reset()
t = time.perf_counter()
logits = decoder.step(ids)
chunk_ms = (time.perf_counter() - t) * 1000 / -(-tokens // decoder.chunk)
t = time.perf_counter()
for i in range(decode):
    logits = decoder.step([int(logits.argmax())])
decode_ms = (time.perf_counter() - t) * 1000 / max(decode, 1)
run = mem()
print(json.dumps({
    "artifact": root.name, "share_weights": share, "load_s": round(load_s, 2),
    "base_mb": {k: round(v) for k, v in base.items()},
    "loaded_mb": {k: round(v - base[k]) for k, v in loaded.items()},
    "after_run_mb": {k: round(v - base[k]) for k, v in run.items()},
    "prefill_chunk_ms": round(chunk_ms), "decode_ms": round(decode_ms, 1),
    "weight_sharing": decoder.weight_sharing,
}))
"""


def measure(artifact: str, share: bool, threads: int, tokens: int, decode: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, artifact, "1" if share else "0",
                          str(threads), str(tokens), str(decode)],
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{artifact}: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64, help="prompt tokens (default 64)")
    ap.add_argument("--decode", type=int, default=8, help="single-token steps (default 8)")
    args = ap.parse_args(argv)
    for artifact in args.artifacts:
        for share in (False, True):
            print(json.dumps(measure(artifact, share, args.threads, args.tokens, args.decode)),
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
