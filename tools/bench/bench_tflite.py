#!/usr/bin/env python3
"""SmolLM2-135M as TFLite (LiteRT) next to ONNX (ONNX Runtime): speed, memory, size, quality.

    python tools/bench/bench_tflite.py [--rounds 3] [--out artifacts/bench/tflite]

Builds what is missing (once; later runs reuse the artifacts under --out):
  onnx-fp32   slmedge export                                      (main venv)
  onnx-int8   slmedge quantize onnx-fp32 --quant int8             (main venv)
  onnx-int4   slmedge quantize onnx-fp32 --quant int4             (main venv)
  tflite-fp32 slmedge export --format tflite                      (.venv-tflite)
  tflite-int8-dynamic / tflite-int4-block32: the same, --from-artifact tflite-fp32 --quant ...

Then measures every variant with ``slmedge bench`` in its own subprocess (2 threads, 128
prompt + 128 new tokens), alternating the variants round by round (the machines here move
about +-15% between passes: DESIGN.md), and takes the median per variant. Quality comes from
each artifact's quality card (perplexity on the first 4096 tokens of eval_mansfield_park.txt,
windows 512 / stride 256; greedy agreement against the fp32 graph of the same format), plus
one cross-format card: the fp32 TFLite graph against the fp32 ONNX graph.

Writes ``bench_tflite.json`` and ``bench_tflite.md`` into --out and prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MAIN = REPO / ".venv" / "bin" / "slmedge"
TFL = REPO / ".venv-tflite" / "bin" / "slmedge"
TFL_PY = REPO / ".venv-tflite" / "bin" / "python"

#: One prefill signature of 128 tokens (the bench prompt) and a 1024-row cache: every extra
#: signature is another torch.export + lowering (~40 min for SmolLM2 on a loaded 2-core box).
TFL_SIZES = ["--prefill-chunks", "128", "--context-length", "1024"]
#: name -> (format, recipe label, slmedge of the venv, command that builds it (None: export))
VARIANTS = {
    "onnx-fp32": ("onnx", "fp32", MAIN, ["export"]),
    "onnx-int8": ("onnx", "int8", MAIN, ["quantize", "{out}/onnx-fp32", "--quant", "int8"]),
    "onnx-int4": ("onnx", "int4", MAIN, ["quantize", "{out}/onnx-fp32", "--quant", "int4"]),
    "tflite-fp32": ("tflite", "fp32", TFL, ["export", "--format", "tflite", *TFL_SIZES]),
    "tflite-int8-dynamic": (
        "tflite",
        "int8-dynamic",
        TFL,
        [
            "export",
            "--format",
            "tflite",
            "--from-artifact",
            "{out}/tflite-fp32",
            *TFL_SIZES,  # --from-artifact checks they match the fp32 graph's
            "--quant",
            "int8-dynamic",
        ],
    ),
    "tflite-int4-block32": (
        "tflite",
        "int4-block32",
        TFL,
        [
            "export",
            "--format",
            "tflite",
            "--from-artifact",
            "{out}/tflite-fp32",
            *TFL_SIZES,  # --from-artifact checks they match the fp32 graph's
            "--quant",
            "int4-block32",
        ],
    ),
}
#: TFLite variant -> the ONNX variant of the same recipe family (ratios TFLite / ONNX).
PAIRS = {
    "tflite-fp32": "onnx-fp32",
    "tflite-int8-dynamic": "onnx-int8",
    "tflite-int4-block32": "onnx-int4",
}


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build(name: str, out: Path) -> None:
    target = out / name
    if (target / "manifest.json").exists():
        return
    _, _, exe, cmd = VARIANTS[name]
    args = [str(exe), *(a.format(out=out) for a in cmd), "--output", str(target), "--json"]
    say(f"building {name}: {' '.join(args[1:])}")
    log = out / f"{name}.build.log"
    with open(log, "w") as f:
        done = subprocess.run(args, stdout=subprocess.PIPE, stderr=f, text=True)
    if done.returncode != 0:
        raise SystemExit(f"building {name} failed (exit {done.returncode}); see {log}")


def bench_once(name: str, out: Path, threads: int, prompt: int, new: int) -> dict:
    """One ``slmedge bench`` subprocess: load, one warm-up, one measured generation."""
    _, _, exe, _ = VARIANTS[name]
    args = [
        str(exe),
        "bench",
        str(out / name),
        "--threads",
        str(threads),
        "--prompt-tokens",
        str(prompt),
        "--new-tokens",
        str(new),
        "--prompt-buckets",
        str(prompt),
        "--depths",
        str(prompt),
        "--warmup",
        "1",
        "--repeats",
        "1",
        "--json",
        "--label",
        name,
    ]
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench of {name} failed (exit {done.returncode}): {done.stderr[-800:]}")
    return json.loads(done.stdout)


CROSS_CARD = r"""
import json, sys
from pathlib import Path
from slmedge.exporter.quality.card import QualitySettings, eval_token_ids, quality_card
from slmedge.runtimes.sessions.litert_decoder import LiteRTDecoder
from slmedge.runtimes.sessions.onnx_decoder import OnnxDecoder
from slmedge.runtimes.tokenizer import TextTokenizer
tfl, onnx = Path(sys.argv[1]), Path(sys.argv[2])
settings = QualitySettings()
tok = TextTokenizer(tfl)
ids, info = eval_token_ids(tok, settings)
prompts = [tok.encode(p) for p in settings.prompts]
card = quality_card(LiteRTDecoder(tfl / "model.tflite", threads=2), ids,
                    reference=OnnxDecoder(onnx / "model.onnx", threads=2),
                    prompt_ids=prompts, new_tokens=settings.new_tokens, eval_info=info)
print(json.dumps(card.to_dict()))
"""


def cross_card(out: Path) -> dict:
    """The fp32 TFLite graph against the fp32 ONNX graph (same text, same prompts)."""
    cache = out / "cross_card.json"
    if cache.exists():
        return json.loads(cache.read_text())
    say("quality: fp32 TFLite vs fp32 ONNX")
    done = subprocess.run(
        [str(TFL_PY), "-c", CROSS_CARD, str(out / "tflite-fp32"), str(out / "onnx-fp32")],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"cross-format quality card failed: {done.stderr[-800:]}")
    card = json.loads(done.stdout.strip().splitlines()[-1])
    cache.write_text(json.dumps(card, indent=2) + "\n")
    return card


def quality_of(out: Path, name: str) -> dict:
    manifest = json.loads((out / name / "manifest.json").read_text())
    return manifest.get("quality") or {}


def summarize(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def table(rows: dict[str, dict]) -> str:
    head = (
        "| variant | size MB | load s | TTFT ms (128) | prefill tok/s | decode tok/s | "
        "decode p50 / p99 ms | peak RSS MB | perplexity | ppl vs fp32 | greedy agree vs "
        "fp32 | decode x ONNX | TTFT x ONNX | size x ONNX |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in rows.items():
        pair = rows.get(PAIRS.get(name, ""), {})

        def ratio(key, row=r, other=pair):
            a, b = row.get(key), other.get(key)
            return f"{a / b:.2f}" if a and b else ""

        ppl = r.get("perplexity")
        inc = r.get("ppl_increase_pct")
        agree = r.get("greedy_agreement")
        lines.append(
            f"| {name} | {r['model_size_mb']:.1f} | {r['load_s']:.2f} | {r['ttft_ms']:.0f} | "
            f"{r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.1f} | "
            f"{r['decode_ms_p50']:.1f} / {r['decode_ms_p99']:.1f} | {r['peak_rss_mb']:.0f} | "
            f"{ppl:.3f} | {'' if inc is None else f'{inc:+.2f}%'} | "
            f"{'' if agree is None else f'{agree:.1%}'} | {ratio('decode_tokens_per_s')} | "
            f"{ratio('ttft_ms')} | {ratio('model_size_mb')} |"
            if ppl is not None
            else f"| {name} | (no quality card) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "artifacts" / "bench" / "tflite")
    p.add_argument("--rounds", type=int, default=3, help="alternating passes over the variants")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--only", nargs="*", choices=list(VARIANTS), help="a subset of the variants")
    args = p.parse_args(argv)
    for exe in (MAIN, TFL):
        if not exe.exists():
            raise SystemExit(f"{exe} is missing: run tools/setup.sh and tools/setup_tflite.sh")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    names = args.only or list(VARIANTS)
    for name in names:
        build(name, out)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for k in range(args.rounds):
        for name in names:  # alternate: every round visits every variant once
            say(f"round {k + 1}/{args.rounds}: {name}")
            runs[name].append(
                bench_once(name, out, args.threads, args.prompt_tokens, args.new_tokens)
            )
    rows: dict[str, dict] = {}
    for name in names:
        row = {
            key: summarize(runs[name], key)
            for key in (
                "model_size_mb",
                "load_s",
                "ttft_ms",
                "prefill_tokens_per_s",
                "decode_tokens_per_s",
                "decode_ms_p50",
                "decode_ms_p99",
                "peak_rss_mb",
            )
        }
        card = quality_of(out, name)
        row.update(
            {
                "perplexity": card.get("perplexity"),
                "ppl_increase_pct": card.get("ppl_increase_pct"),
                "greedy_agreement": (card.get("greedy") or {}).get("top1_agreement"),
                "first_divergence": (card.get("greedy") or {}).get("first_divergence"),
                "decode_tokens_per_s_all": [r["decode_tokens_per_s"] for r in runs[name]],
                "ttft_ms_all": [r["ttft_ms"] for r in runs[name]],
            }
        )
        rows[name] = row
    cross = cross_card(out) if {"tflite-fp32", "onnx-fp32"} <= set(names) else None
    env = runs[names[0]][0].get("environment", {})
    doc = {
        "rows": rows,
        "cross_format_fp32": cross,
        "rounds": args.rounds,
        "threads": args.threads,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "cpu": env.get("cpu"),
        "note": "median over alternating rounds; each bench a fresh subprocess",
    }
    (out / "bench_tflite.json").write_text(json.dumps(doc, indent=2) + "\n")
    text = table(rows)
    if cross:
        greedy = cross.get("greedy") or {}
        text += (
            f"\n\nfp32 TFLite vs fp32 ONNX on the same text: perplexity "
            f"{cross['perplexity']:.4f} vs {cross['reference_perplexity']:.4f}, top-1 "
            f"agreement {cross['top1_agreement_eval']:.2%}, greedy agreement "
            f"{greedy.get('top1_agreement', 0):.1%}, KL {cross['kl_mean']:.2e}"
        )
    (out / "bench_tflite.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
