#!/usr/bin/env python3
"""SmolLM2-135M static-shape graphs on the QNN HTP emulator (onnxruntime-qnn) next to the CPU
provider and the fp32 reference: placement, quality card, time per call (issue 4).

    python tools/bench/bench_qnn.py [--variants a16w8 fp16] [--providers cpu qnn] \
        [--eval-tokens 1024] [--prompts 3] [--new-tokens 16] [--json out.json]

Builds what is missing under --out (later runs reuse it), timing each export:
  a16w8  slmedge export --profile android-qnn-htp        (static 512 / 64, a16w8 QDQ)
  fp16   slmedge export --profile android-qnn-htp-fp16   (static 512 / 64, fp16)

Then, for every variant x provider, in a subprocess of its own (an emulator crash or its
memory stays there):
  * the decoder of the static graphs (``runtimes.sessions.static_decoder``); ``qnn`` is the profile's
    provider list with CPU fallback disabled (``session.disable_cpu_ep_fallback=1``) and
    strict, so a node the HTP cannot take fails the run instead of running on CPU;
  * nodes placed on QNN / total, per graph, from ONNX Runtime's graph-assignment record;
  * ms per prefill chunk (64 tokens) and per decode step, median of --timing-repeats calls.
    The emulator runs the Hexagon instruction set on this x86 CPU: its timings say nothing
    about a phone;
  * the quality card (``exporter.quality.card.decoder_card``) against the fp32 dynamic graph on CPU:
    perplexity on the first --eval-tokens tokens of eval_mansfield_park.txt (windows 512,
    stride 256), KL, greedy top-1 agreement and first divergence on --prompts prompts x
    --new-tokens tokens (the candidate is fed the reference's tokens).

Prints a side-by-side table and writes --json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORK = REPO / "artifacts"
#: variant -> built-in profile that exports it
VARIANTS = {"a16w8": "android-qnn-htp", "fp16": "android-qnn-htp-fp16"}
PROVIDERS = ("cpu", "qnn")
QNN = "QNNExecutionProvider"


def say(msg: str) -> None:
    print(f"[bench_qnn] {msg}", file=sys.stderr, flush=True)


def export(variant: str, hf_dir: Path, out: Path) -> float | None:
    """Export ``variant`` into ``out`` unless it is there; seconds taken (None: reused)."""
    if (out / "manifest.json").exists():
        return None
    cmd = [sys.executable, "-m", "slmedge.tools.cli", "export", "--model", str(hf_dir),
           "--profile", VARIANTS[variant], "-o", str(out), "--overwrite"]
    say("$ " + " ".join(cmd))
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return round(time.perf_counter() - t0, 1)


# -- one variant on one provider (runs in its own process) --------------------------------


def measure(artifact: Path, provider: str, reference: Path, eval_tokens: int, prompts: int,
            new_tokens: int, repeats: int, threads: int) -> dict:
    """Placement, time per call and quality card of ``artifact``'s static graphs."""
    from slmedge.device_profiles import load_profile
    from slmedge.exporter.quality.card import DEFAULT_PROMPTS, QualitySettings, decoder_card
    from slmedge.runtimes.artifact import open_artifact
    from slmedge.runtimes.sessions.onnx_decoder import OnnxDecoder
    from slmedge.runtimes.sessions.static_decoder import open_decoder

    opened = open_artifact(artifact)
    profile = load_profile(opened.manifest["profile"]["name"])
    t0 = time.perf_counter()
    if provider == "qnn":
        decoder = open_decoder(opened, threads=threads, providers=profile.provider_specs(),
                               strict=True, allow_cpu_fallback=profile.runtime.allow_cpu_fallback)
    else:
        decoder = open_decoder(opened, threads=threads)
    load_s = time.perf_counter() - t0
    say(f"{artifact.name} on {provider}: sessions built in {load_s:.0f} s")
    placement = {kind: {"total": p.total_nodes, "qnn": p.nodes_by_provider.get(QNN, 0),
                        "by_provider": p.nodes_by_provider}
                 for kind, p in decoder.placement.items() if p is not None}
    chunk = decoder.chunk
    ids = list(range(1000, 1000 + chunk))
    prefill_ms, decode_ms = [], []
    for _ in range(repeats + 1):  # the first call of each graph is a warm-up
        decoder.reset()
        t = time.perf_counter()
        decoder.step(ids)
        prefill_ms.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        decoder.step([ids[0]])
        decode_ms.append((time.perf_counter() - t) * 1000)
    decoder.reset()
    say(f"{artifact.name} on {provider}: {statistics.median(prefill_ms[1:]):.0f} ms per prefill "
        f"chunk, {statistics.median(decode_ms[1:]):.0f} ms per decode step")
    settings = QualitySettings(eval_tokens=eval_tokens, prompts=DEFAULT_PROMPTS[:prompts],
                               new_tokens=new_tokens)
    t0 = time.perf_counter()
    card = decoder_card(decoder, artifact, settings,
                        reference=OnnxDecoder(reference / "model.onnx", threads=threads),
                        progress=lambda m: say(f"{artifact.name} on {provider}: {m}"))
    return {"placement": placement, "load_s": round(load_s, 1),
            "prefill_chunk": chunk, "ms_per_prefill_chunk": round(statistics.median(prefill_ms[1:]), 1),
            "ms_per_decode_step": round(statistics.median(decode_ms[1:]), 1),
            "quality": card.to_dict(), "quality_s": round(time.perf_counter() - t0, 1),
            "providers": decoder.providers()}


def run_measure(args, variant: str, provider: str, artifact: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", str(artifact), provider,
           "--fp32", str(args.fp32), "--eval-tokens", str(args.eval_tokens), "--prompts",
           str(args.prompts), "--new-tokens", str(args.new_tokens), "--timing-repeats",
           str(args.timing_repeats), "--threads", str(args.threads)]
    say(f"{variant} on {provider}")
    t0 = time.perf_counter()
    # stderr passes through live (progress, ORT's warnings, the error of a failed run).
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    seconds = round(time.perf_counter() - t0, 1)
    if done.returncode != 0:
        say(f"{variant} on {provider} failed (exit {done.returncode}): see stderr above")
        return {"error": f"exit {done.returncode}", "seconds": seconds}
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "seconds": seconds}


# -- table --------------------------------------------------------------------------------


def row_of(variant: str, provider: str, res: dict, export_s) -> dict:
    row = {"variant": variant, "provider": provider, "export_s": export_s}
    if "error" in res:
        return {**row, "error": res["error"]}
    q = res["quality"]
    greedy = q.get("greedy", {})
    place = res["placement"]
    return {**row,
            "nodes_on_qnn": {k: f"{v['qnn']}/{v['total']}" for k, v in place.items()},
            "placement": place,
            "perplexity": round(q["perplexity"], 3),
            "reference_perplexity": round(q["reference_perplexity"], 3),
            "ppl_increase_pct": round(q["ppl_increase_pct"], 2),
            "kl_mean": round(q["kl_mean"], 4),
            "top1_agreement_eval": round(q["top1_agreement_eval"], 4),
            "greedy_agreement": round(greedy.get("top1_agreement", float("nan")), 4),
            "first_divergence": greedy.get("first_divergence"),
            "ms_per_prefill_chunk": res["ms_per_prefill_chunk"],
            "ms_per_decode_step": res["ms_per_decode_step"],
            "eval": q["eval"], "greedy": greedy,
            "load_s": res["load_s"], "quality_s": res["quality_s"], "seconds": res["seconds"]}


def print_table(rows: list[dict], args) -> None:
    ref = next((r["reference_perplexity"] for r in rows if "reference_perplexity" in r), None)
    print(f"Quality: first {args.eval_tokens} tokens of eval_mansfield_park.txt (windows 512, "
          f"stride 256); greedy: {args.prompts} prompts x {args.new_tokens} tokens; reference: "
          f"fp32 dynamic graph on CPU. Emulator timings say nothing about a phone.")
    print("| variant | provider | nodes on QNN (prefill, decode) | perplexity | vs fp32 | KL | "
          "greedy top-1 agreement | first divergence | ms / prefill chunk | ms / decode step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    if ref is not None:
        print(f"| fp32 (dynamic) | CPU | - | {ref} | (reference) | | | | | |")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | {r['provider']} | failed: {r['error'][:120]} | | | | | | | |")
            continue
        nodes = ", ".join(r["nodes_on_qnn"].values())
        print(f"| {r['variant']} | {r['provider']} | {nodes} | {r['perplexity']} | "
              f"{r['ppl_increase_pct']:+.2f}% | {r['kl_mean']} | {r['greedy_agreement']:.1%} | "
              f"{r['first_divergence']} | {r['ms_per_prefill_chunk']} | {r['ms_per_decode_step']} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-dir", type=Path, default=WORK / "bench" / "smollm2-135m-hf")
    ap.add_argument("--fp32", type=Path, default=WORK / "bench" / "slmedge-fp32",
                    help="fp32 dynamic slmedge artifact: the quality card's reference")
    ap.add_argument("--out", type=Path, default=WORK / "qnn", help="where the exports go")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--prompts", type=int, default=3, help="first N of the card's prompts")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--timing-repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--measure", nargs=2, metavar=("ARTIFACT", "PROVIDER"),
                    help=argparse.SUPPRESS)  # internal: one measurement, JSON on stdout
    args = ap.parse_args(argv)

    if args.measure:
        from slmedge.runtimes.errors import SlmEdgeError

        artifact, provider = args.measure
        try:
            res = measure(Path(artifact), provider, args.fp32, args.eval_tokens, args.prompts,
                          args.new_tokens, args.timing_repeats, args.threads)
        except SlmEdgeError as e:  # e.g. a node the HTP cannot take with CPU fallback off
            res = {"error": str(e)}
        print(json.dumps(res))
        return 0

    rows = []
    for variant in args.variants:
        artifact = args.out / f"smollm2-{variant}"
        export_s = export(variant, args.hf_dir, artifact)
        if export_s is None:
            timings = json.loads((artifact / "manifest.json").read_text()).get("timings_s", {})
            export_s = timings.get("total")
        for provider in args.providers:
            rows.append(row_of(variant, provider, run_measure(args, variant, provider, artifact),
                               export_s))
    print_table(rows, args)
    if args.json:
        args.json.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                         "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
