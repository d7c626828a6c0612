"""One decode step of several ONNX decoders under ONNX Runtime's profiler, node by node (issue 16).

    python tools/bench/profile_decode.py A=path/to/model.onnx B=path/to/other.onnx \
        [--past 192] [--steps 300] [--rounds 2] [--threads 2] [--json out.json]

Each graph runs in its own subprocess (one ORT session, ``enable_profiling``), fed one new
token at the same position (``--past`` cached tokens, seeded random cache) ``--steps``
times after 10 warm-up steps; the graphs alternate round after round. Works for any graph
with the usual decoder inputs (``input_ids``, ``attention_mask``, optional ``position_ids``
and ``logits_to_keep``, ``past_key_values.N.key/value``): slmedge's and GenAI's builder's.

Why medians: on a shared machine a step is often preempted, and a mean then measures the
scheduler. Each node's time is the median of its ``--steps`` kernel times; an op type's
time is the sum of its nodes' medians; ``kernel_sum_us`` adds every node's median. Node
names are grouped by role with their digits replaced by ``#`` (``layers.#.attn...``), so
30 layers' q/k/v projections are one line. Only shares and same-run ratios mean anything;
the 1-minute load average is recorded per run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

_WORKER = r"""
import json, os, sys
import numpy as np, onnx, onnxruntime as ort
path, past, steps, threads, prefix = sys.argv[1], *map(int, sys.argv[2:5]), sys.argv[5]
graph = onnx.load(path, load_external_data=False).graph
types = {1: np.float32, 6: np.int32, 7: np.int64, 10: np.float16}
rng = np.random.default_rng(0)
feeds = {}
for inp in graph.input:
    name, tt = inp.name, inp.type.tensor_type
    dt = types[tt.elem_type]
    if name == "input_ids":
        feeds[name] = np.array([[42]], dt)
    elif name == "attention_mask":
        feeds[name] = np.ones((1, past + 1), dt)
    elif name == "position_ids":
        feeds[name] = np.array([[past]], dt)
    elif name == "logits_to_keep":
        feeds[name] = np.array(1, dt)
    elif name.startswith("past_key_values"):
        dims = [d.dim_value for d in tt.shape.dim]  # [batch, kv_heads, past, head_size]
        feeds[name] = (rng.standard_normal((1, dims[1], past, dims[3] or 64)) * 0.5).astype(dt)
    else:
        raise SystemExit(f"{path}: input {name!r} is not a decoder input this script knows "
                         "(input_ids, attention_mask, position_ids, logits_to_keep, past_key_values.*)")
so = ort.SessionOptions()
so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
so.enable_profiling, so.profile_file_prefix = True, prefix
sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
for _ in range(10 + steps):
    sess.run(None, feeds)
trace = sess.end_profiling()
events = json.load(open(trace))
os.remove(trace)
runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"][-steps:]
start = runs[0]["ts"]
nodes = {}
for e in events:
    if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
        nodes.setdefault(e["name"][:-len("_kernel_time")], [e["args"]["op_name"], []])[1].append(e["dur"])
print(json.dumps({"run_us": [r["dur"] for r in runs], "nodes": nodes,
                  "graph_nodes": len(graph.node), "load": os.getloadavg()}))
"""


def profile_once(path: Path, past: int, steps: int, threads: int) -> dict:
    """Profile ``path`` in a subprocess; per-node and per-op-type medians in microseconds."""
    with tempfile.TemporaryDirectory() as tmp:
        res = subprocess.run([sys.executable, "-c", _WORKER, str(path), str(past), str(steps),
                              str(threads), str(Path(tmp) / "ort")], capture_output=True,
                             text=True)
    if res.returncode:
        raise RuntimeError(f"profiling {path} failed (exit {res.returncode}):\n{res.stderr[-2000:]}")
    raw = json.loads(res.stdout.strip().splitlines()[-1])
    return summarize(raw)


def summarize(raw: dict, top: int = 12) -> dict:
    """Medians per node, sums per op type and per role (node name with digits as ``#``), and
    the ``top`` slowest nodes by name (a role sum hides e.g. the lm_head among the layers)."""
    node_us = {name: statistics.median(durs) for name, (_, durs) in raw["nodes"].items()}
    ops: dict[str, float] = defaultdict(float)
    op_nodes: Counter = Counter()
    roles: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for name, (op, _) in raw["nodes"].items():
        ops[op] += node_us[name]
        op_nodes[op] += 1
        role = roles[re.sub(r"\d+", "#", name)]
        role[0] += 1
        role[1] += node_us[name]
    total = sum(ops.values())
    return {
        "model_run_median_us": statistics.median(raw["run_us"]),
        "kernel_sum_us": round(total, 1),
        "graph_nodes": raw["graph_nodes"],
        "timed_nodes": len(node_us),
        "op_types": {op: {"nodes": op_nodes[op], "us": round(us, 1),
                          "share": round(us / total, 4) if total else 0.0}
                     for op, us in sorted(ops.items(), key=lambda kv: -kv[1])},
        "roles": {name: {"nodes": n, "us": round(us, 1)}
                  for name, (n, us) in sorted(roles.items(), key=lambda kv: -kv[1][1])},
        "top_nodes": {name: round(us, 1) for name, us in
                      sorted(node_us.items(), key=lambda kv: -kv[1])[:top]},
        "load_average": [round(x, 2) for x in raw["load"]],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("graphs", nargs="+", metavar="NAME=MODEL.onnx")
    ap.add_argument("--past", type=int, default=192, help="cached tokens before the step")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    graphs = []
    for spec in args.graphs:
        name, sep, path = spec.partition("=")
        if not sep or not Path(path).is_file():
            ap.error(f"expected NAME=MODEL.onnx with an existing file, got {spec!r}")
        graphs.append((name, Path(path)))
    runs: dict[str, list[dict]] = {name: [] for name, _ in graphs}
    for rnd in range(args.rounds):
        for name, path in graphs if rnd % 2 == 0 else graphs[::-1]:
            r = profile_once(path, args.past, args.steps, args.threads)
            runs[name].append(r)
            print(f"[profile_decode] round {rnd + 1}: {name} kernels {r['kernel_sum_us']:.0f} us "
                  f"(load {r['load_average'][0]})", file=sys.stderr)
    doc = {"past": args.past, "steps": args.steps, "threads": args.threads,
           "note": "per node the median over steps; shares and same-run ratios only (shared CPU)",
           "graphs": {name: {"path": str(path), "runs": runs[name]} for name, path in graphs}}
    for name, _ in graphs:
        last = runs[name][-1]
        print(f"## {name}: {last['graph_nodes']} nodes, kernel sum {last['kernel_sum_us']:.0f} us")
        for op, v in list(last["op_types"].items())[:10]:
            print(f"  {op:36s} {v['nodes']:4d} nodes {v['us']:9.1f} us {100 * v['share']:5.1f}%")
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
