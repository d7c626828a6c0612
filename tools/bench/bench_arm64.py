"""The same artifacts on x86 and on an arm64 target: greedy agreement and perplexity (issue 18).

    python tools/bench/bench_arm64.py ARTIFACT... --target ssh://pi@raspberrypi.local [--json out.json]
    python tools/bench/bench_arm64.py ARTIFACT... --chroot /var/cache/slmedge/arm64-bookworm

For each artifact, one replay spec (the card's fixed prompt, ``--new-tokens`` greedy tokens,
the first ``--window`` tokens of the packaged evaluation text) runs here with this machine's
ONNX Runtime, then on the target (``runtimes/check/target_card.py``: token ids in, ids and figures
out) with x86's tokens as the reference for teacher-forced agreement. A row: the recipe (scheme,
label, MatMulNBits accuracy level), both token lists, the common prefix, teacher-forced
agreement and first divergence, both perplexities and their difference.

Targets: ``--target ssh://...`` / ``adb://...`` goes through the runner's own transport
(copy, cached venv; as ``slmedge check --target``). ``--chroot ROOT`` runs the root filesystem
that ``tools/setup_arm64.sh`` builds (Debian arm64 through qemu-user; its venv is the one the
tests make) without an sshd; ``--qemu-cpu`` picks the emulated CPU (``max``: dot product and
i8mm as on a Pi 5 or a phone; ``cortex-a72``: a Pi 4). Emulated timings mean nothing; the
JSON records the load average before and after each row anyway (the machine is shared).

The JSON is rewritten after every row, so an interrupted run keeps what it measured; run again
with the same ``--json`` and settings, it skips the artifacts already there and adds the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from slmedge.runtimes.artifact import open_artifact
from slmedge.runtimes.sessions.static_decoder import open_decoder
from slmedge.runtimes.check.target_card import REPLAY_PROMPT, compare, platform_facts, run_spec
from slmedge.runtimes.texts import default_eval_text
from slmedge.runtimes.tokenizer import TextTokenizer

REPO = Path(__file__).resolve().parents[2]
CHROOT_DIR = "tmp/slmedge-bench-arm64"  # inside the root filesystem
CHROOT_PYTHON = "/root/.cache/slmedge/venv/bin/python"  # tests/arm64/conftest.py's venv


def recipe_facts(artifact: Path) -> dict:
    """Scheme, label and MatMulNBits accuracy level as the manifest records them."""
    manifest = open_artifact(artifact).manifest
    quant = manifest.get("quantization") or {}
    recipe = quant.get("recipe") or {}
    out = {"label": quant.get("label") or "fp32",
           "scheme": recipe.get("scheme", "none")}
    if recipe.get("scheme") in ("int4", "int8"):
        out["accuracy_level"] = recipe.get("accuracy_level")
    return out


def make_spec(artifact: Path, new_tokens: int, window: int) -> dict:
    tok = TextTokenizer(artifact)
    ids = tok.encode(default_eval_text().read_text())
    if len(ids) < window:
        raise SystemExit(f"the evaluation text has {len(ids)} tokens, fewer than --window {window}")
    return {"prompt_ids": tok.encode(REPLAY_PROMPT), "new_tokens": new_tokens,  # as the card
            "window_ids": ids[:window]}


def run_chroot(root: Path, artifact: Path, spec: dict, threads: int, qemu_cpu: str,
               timeout: float) -> dict:
    """``target_card`` inside the arm64 root filesystem (chroot; binfmt runs it under qemu)."""
    base = root / CHROOT_DIR
    lib = base / "lib"
    shutil.rmtree(lib, ignore_errors=True)
    (lib / "slmedge").mkdir(parents=True)
    (lib / "slmedge" / "__init__.py").write_text("")
    shutil.copytree(REPO / "runtimes", lib / "slmedge" / "runtimes",
                    ignore=shutil.ignore_patterns("__pycache__"))
    dst = base / "artifacts" / artifact.resolve().name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(artifact, dst)
    (base / "spec.json").write_text(json.dumps(spec))
    inner = "/" + CHROOT_DIR
    if not (root / CHROOT_PYTHON.lstrip("/")).exists():
        raise SystemExit(f"{root}{CHROOT_PYTHON} is missing: run the arm64 tests once "
                         "(tests/arm64 make the venv), or use --target ssh://...")
    cmd = ["chroot", str(root), "/usr/bin/env", f"QEMU_CPU={qemu_cpu}",
           f"PYTHONPATH={inner}/lib", CHROOT_PYTHON, "-m", "slmedge.runtimes.check.target_card",
           f"{inner}/artifacts/{dst.name}", "--spec-json", f"{inner}/spec.json",
           "--threads", str(threads), "--json"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    finally:
        shutil.rmtree(dst, ignore_errors=True)
    if out.returncode != 0:
        raise RuntimeError(f"target_card in {root} failed (exit {out.returncode}): "
                           f"{out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["target"] = f"chroot {root} (QEMU_CPU={qemu_cpu})"
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("artifacts", nargs="+", type=Path)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", help="ssh://user@host[:port][/dir] or adb://[serial]")
    where.add_argument("--chroot", type=Path, help="arm64 root filesystem (tools/setup_arm64.sh)")
    ap.add_argument("--qemu-cpu", default="max", help="with --chroot: QEMU_CPU (default max)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--window", type=int, default=1024, help="perplexity window (tokens)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=3 * 3600, help="per artifact on the target")
    ap.add_argument("--json", type=Path, help="write the rows here (after each artifact)")
    args = ap.parse_args(argv)

    doc: dict = {"host": platform_facts(), "new_tokens": args.new_tokens, "window": args.window,
                 "threads": args.threads, "prompt": REPLAY_PROMPT,
                 "target": args.target or f"chroot {args.chroot} (QEMU_CPU={args.qemu_cpu})",
                 "rows": []}
    if args.json and args.json.exists():  # resume / add artifacts to a run with the same settings
        old = json.loads(args.json.read_text())
        if all(old.get(k) == doc[k] for k in ("new_tokens", "window", "target", "prompt")):
            doc["rows"] = old["rows"]
    done = {row["artifact"] for row in doc["rows"]}
    for artifact in args.artifacts:
        if str(artifact) in done:
            print(f"{artifact}: already in {args.json}", flush=True)
            continue
        spec = make_spec(artifact, args.new_tokens, args.window)
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        here = run_spec(open_decoder(open_artifact(artifact), threads=args.threads), spec)
        x86_s = time.perf_counter() - t0
        target_spec = dict(spec, reference_tokens=here["tokens"])
        t0 = time.perf_counter()
        if args.chroot:
            there = run_chroot(args.chroot, artifact, target_spec, args.threads, args.qemu_cpu,
                               args.timeout)
        else:
            from slmedge.runtimes.check.remote_card import run_remote_card

            there = run_remote_card(args.target, artifact, target_spec, threads=args.threads,
                                    timeout=args.timeout)
        target_s = time.perf_counter() - t0
        report = compare(here, there)
        row = {"artifact": str(artifact), **recipe_facts(artifact),
               "host_machine": platform.machine(),
               "target_machine": there["platform"]["machine"],
               "target_onnxruntime": there["platform"]["onnxruntime"],
               "tokens_equal": report["tokens_equal"], "same_prefix": report["same_prefix"],
               "greedy_agreement": report.get("greedy_agreement"),
               "first_divergence": report.get("first_divergence"),
               "host_perplexity": here["perplexity"], "target_perplexity": there["perplexity"],
               "ppl_diff_pct": report["ppl_diff_pct"],
               "host_tokens": here["tokens"], "target_tokens": there["tokens"],
               "seconds": {"host": round(x86_s, 1), "target": round(target_s, 1)},
               "loadavg": {"before": load_before, "after": os.getloadavg()}}
        doc["rows"].append(row)
        print(f"{artifact.name:12s} {row['label']:28s} level {row.get('accuracy_level')}: tokens "
              f"{row['same_prefix']}/{len(here['tokens'])} same (teacher-forced "
              f"{row['greedy_agreement']:.3f}), perplexity {here['perplexity']:.3f} "
              f"{platform.machine()} / {there['perplexity']:.3f} {row['target_machine']} "
              f"({row['ppl_diff_pct']:+.2f}%), {target_s:.0f} s on the target", flush=True)
        if args.json:
            args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
