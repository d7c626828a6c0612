"""An fp16 graph's verification session with and without the fp32 copy of its weights (issue 15).

    python tools/bench/bench_fp16_session.py FP16_ARTIFACT [--rounds 2] [--decode-steps 8]
        [--json tools/bench/results/fp16_session_0.5b.json]

ONNX Runtime on x86 has no fp16 MatMul: it inserts a Cast before each, and its
``FuseFp16InitializerToFp32NodeTransformer`` turns every Cast(fp16 weight) into an fp32
weight at load (twice the file in memory). ``folded``: the export's verification options as
they were (``verification_session_options()``); ``kept``: ``keep_fp16=True`` (that
transformer off, priority-based execution order, fixed mmap threshold). Each measurement is a
fresh process: session creation seconds, RSS after load, a 512-token prefill (all logits),
``--decode-steps`` single-token steps, peak RSS (the process's own VmHWM), and the prefill's
last logit rows so the two can be compared. The modes alternate within each round; the load
average is recorded (the machine is shared: wall times are inflated, RSS is not).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

_CHILD = r"""
import json, sys, time
import numpy as np
from slmedge.exporter.quality.memory import verification_session_options
from slmedge.runtimes.sessions.onnx_decoder import OnnxDecoder

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024

path, mode, steps, rows = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
t0 = time.perf_counter()
decoder = OnnxDecoder(path, session_options=verification_session_options(keep_fp16=mode == "kept"))
create = time.perf_counter() - t0
after_load = status("VmRSS:")
t0 = time.perf_counter()
logits = decoder.step(list(range(100, 612)), all_logits=True)
prefill = time.perf_counter() - t0
t0 = time.perf_counter()
for _ in range(steps):
    decoder.step([5])
decode = (time.perf_counter() - t0) / steps
np.save(rows, np.asarray(logits[-8:], dtype=np.float32))
print(json.dumps({"mode": mode, "create_s": round(create, 2), "rss_after_load_mb": round(after_load),
                  "prefill_512_s": round(prefill, 2), "decode_step_ms": round(decode * 1000),
                  "peak_rss_mb": round(status("VmHWM:"))}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import numpy as np

    model = args.artifact / "model.onnx"
    data = model.with_name(model.name + ".data")
    runs: list[dict] = []
    loads = [os.getloadavg()]
    scratch = Path(os.environ.get("TMPDIR", "/tmp"))
    for r in range(args.rounds):
        for mode in (("folded", "kept") if r % 2 == 0 else ("kept", "folded")):
            rows = scratch / f"fp16_session_{mode}.npy"
            out = subprocess.run([sys.executable, "-c", _CHILD, str(model), mode,
                                  str(args.decode_steps), str(rows)],
                                 check=True, capture_output=True, text=True)
            runs.append({"round": r, **json.loads(out.stdout.strip().splitlines()[-1])})
            loads.append(os.getloadavg())
            print(json.dumps(runs[-1]), file=sys.stderr)
    folded = np.load(scratch / "fp16_session_folded.npy")
    kept = np.load(scratch / "fp16_session_kept.npy")
    result = {
        "artifact": str(args.artifact),
        "file_mb": round((model.stat().st_size + (data.stat().st_size if data.exists() else 0))
                         / 1e6),
        "runs": runs,
        "max_abs_logit_diff": float(np.abs(folded - kept).max()),
        "logit_scale": float(np.abs(folded).max()),
        "load_average": [[round(x, 2) for x in load] for load in loads],
    }
    text = json.dumps(result, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
