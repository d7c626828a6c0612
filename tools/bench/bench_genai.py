"""slmedge vs ONNX Runtime GenAI's model builder, side by side in one run (issue 3).

    python tools/bench/bench_genai.py [--variants fp32] [--rounds 3] [--json out.json]

What it does, on SmolLM2-135M (the embedded model) by default:

1. prepares, once, under ``artifacts/bench/`` (reused by later runs):
   - ``smollm2-135m-hf``: the embedded model dequantized and saved as an HF directory
     (``save_pretrained`` model + tokenizer): the builder needs one, and both tools then
     start from the very same weights;
   - ``slmedge-<variant>``: ``slmedge export`` of that directory (fused by default);
   - ``genai-<variant>``: ``onnxruntime_genai.models.builder`` of that directory, with
     ``intra_op_num_threads`` written into its ``genai_config.json``;
2. measures each (tool, variant) in its own subprocess, alternating tools round after
   round, with the same prompt ids (:func:`slmedge.runtimes.bench.runner.bench_prompt_ids`),
   the same prompt/new token counts and thread count, generation never stopping early;
3. prints a table with tok/s, TTFT and the slmedge/GenAI ratios, and writes JSON.

Variants: ``fp32`` today. A variant is a row of :data:`VARIANTS`: how slmedge exports it
(extra ``slmedge export`` flags) and which builder precision it is compared with, so
quantized variants (int4, int8) are one entry each.

Only ratios taken in the same run mean anything: the CPU is shared and its speed moves
(DESIGN.md: about +-15% between two passes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_WORKDIR = REPO / "artifacts" / "bench"
DEFAULT_SOURCE = "embedded:smollm2-135m-instruct"
GENAI_REQUIREMENT = "onnxruntime-genai==0.18.0"  # needs onnxruntime>=1.31: no conflict with ours


@dataclass(frozen=True)
class Variant:
    """One precision compared between the tools."""

    name: str
    slmedge_flags: tuple[str, ...] = ()  # extra `slmedge export` flags
    genai_precision: str = "fp32"  # builder -p
    genai_extra: dict = field(default_factory=dict)  # builder --extra_options k=v


VARIANTS: dict[str, Variant] = {
    "fp32": Variant("fp32"),
    "fp32-unfused": Variant("fp32-unfused", slmedge_flags=("--no-fuse",)),
}


def say(msg: str) -> None:
    print(f"[bench_genai] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw) -> None:
    say("$ " + " ".join(map(str, cmd)))
    subprocess.run(cmd, check=True, **kw)


# -- preparation -------------------------------------------------------------------------


def prepare_hf_dir(workdir: Path, source: str) -> Path:
    """The source model as an HF directory (dequantized fp32 weights + tokenizer)."""
    out = workdir / "smollm2-135m-hf"
    if (out / "config.json").exists():
        return out
    # A GGUF-loaded model refuses save_pretrained (it is marked as gguf-quantized): copy
    # its dequantized weights into a fresh model of the same config and save that.
    code = (
        "import torch, transformers\n"
        "from slmedge.exporter.sources.load import load_source\n"
        f"m = load_source({source!r}, dtype='fp32')\n"
        "cfg = m.model.config\n"
        "if hasattr(cfg, 'quantization_config'): del cfg.quantization_config\n"
        "fresh = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)\n"
        "fresh.load_state_dict(m.model.state_dict())\n"
        "fresh.generation_config = m.model.generation_config\n"
        f"fresh.save_pretrained({str(out)!r}); m.tokenizer.save_pretrained({str(out)!r})\n"
    )
    run([sys.executable, "-c", code])
    return out


def ensure_genai() -> None:
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        run([sys.executable, "-m", "pip", "install", GENAI_REQUIREMENT])


def prepare_genai(workdir: Path, hf_dir: Path, variant: Variant, threads: int) -> Path:
    out = workdir / f"genai-{variant.genai_precision}"
    config = out / "genai_config.json"
    if not config.exists():
        ensure_genai()
        extra = [f"{k}={v}" for k, v in variant.genai_extra.items()]
        run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir),
             "-o", str(out), "-p", variant.genai_precision, "-e", "cpu",
             "-c", str(workdir / "genai-cache"), *(["--extra_options", *extra] if extra else [])])
    doc = json.loads(config.read_text())
    session = doc["model"]["decoder"].setdefault("session_options", {})
    if session.get("intra_op_num_threads") != threads or session.get("inter_op_num_threads") != 1:
        session["intra_op_num_threads"] = threads
        session["inter_op_num_threads"] = 1
        config.write_text(json.dumps(doc, indent=4))
    return out


def prepare_slmedge(workdir: Path, hf_dir: Path, variant: Variant) -> Path:
    out = workdir / f"slmedge-{variant.name}"
    if (out / "manifest.json").exists():
        return out
    run([sys.executable, "-m", "slmedge.tools.cli", "export", "--model", str(hf_dir),
         "--output", str(out), "--overwrite", *variant.slmedge_flags])
    return out


# -- one measurement, in a child process ------------------------------------------------


def _summary(ttft_s: list[float], decode_tps: list[float]) -> dict:
    import resource

    return {
        "ttft_ms": round(statistics.median(ttft_s) * 1000, 2),
        "decode_tokens_per_s": round(statistics.median(decode_tps), 3),
        "ttft_ms_all": [round(t * 1000, 2) for t in ttft_s],
        "decode_tokens_per_s_all": [round(t, 3) for t in decode_tps],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6, 1),
    }


def child_slmedge(path: Path, prompt: list[int], new_tokens: int, threads: int, repeats: int) -> dict:
    """slmedge's own loop (``runtimes.generation.generate``), as ``slmedge bench`` runs it."""
    from slmedge.runtimes.generation import generate
    from slmedge.runtimes.sessions.onnx_decoder import OnnxDecoder

    t0 = time.perf_counter()
    decoder = OnnxDecoder(path / "model.onnx", threads=threads)
    load_s = time.perf_counter() - t0
    ttft, tps = [], []
    for i in range(1 + repeats):  # one warm-up
        result = generate(decoder, prompt, new_tokens)
        assert len(result.tokens) == new_tokens
        if i:
            ttft.append(result.ttft_s)
            tps.append(result.decode_tokens_per_s)
    return {"load_s": round(load_s, 3), "first_tokens": result.tokens[:16], **_summary(ttft, tps)}


def child_genai(path: Path, prompt: list[int], new_tokens: int, threads: int, repeats: int) -> dict:
    """ONNX Runtime GenAI's generator loop, greedy, exactly ``new_tokens`` tokens.

    TTFT = ``append_tokens`` (prefill) + the first ``generate_next_token`` (picks the token);
    each later ``generate_next_token`` runs the model on the previous token and picks the
    next, like one step of slmedge's loop."""
    import onnxruntime_genai as og

    config = json.loads((path / "genai_config.json").read_text())
    threads_set = config["model"]["decoder"].get("session_options", {}).get("intra_op_num_threads")
    if threads_set != threads:
        raise SystemExit(f"{path}/genai_config.json has intra_op_num_threads={threads_set}, not {threads}")
    t0 = time.perf_counter()
    model = og.Model(str(path))
    load_s = time.perf_counter() - t0
    total = len(prompt) + new_tokens
    ttft, tps = [], []
    for i in range(1 + repeats):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        generator = og.Generator(model, params)
        tokens = []
        t = time.perf_counter()
        generator.append_tokens(prompt)
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
        first = time.perf_counter() - t
        t = time.perf_counter()
        while len(tokens) < new_tokens:
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        rest = time.perf_counter() - t
        if i:
            ttft.append(first)
            tps.append((new_tokens - 1) / rest)
        del generator
    return {"load_s": round(load_s, 3), "first_tokens": tokens[:16], **_summary(ttft, tps),
            "onnxruntime_genai": og.__version__}


# -- the comparison -----------------------------------------------------------------------


@dataclass
class Entry:
    tool: str  # "slmedge" | "genai"
    label: str  # variant name (slmedge) or builder precision (genai)
    path: Path


def size_mb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.glob("model.onnx*")) / 1e6, 1)


def measure(entry: Entry, prompt_file: Path, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", entry.tool, str(entry.path),
           "--prompt-file", str(prompt_file), "--new-tokens", str(args.new_tokens),
           "--threads", str(args.threads), "--repeats", str(args.repeats)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(results: dict, variants: list[Variant]) -> str:
    def med(key, values):
        return statistics.median(v[key] for v in values)

    def paired(key, s_runs, g_runs, invert=False):
        # Ratio within each round (same minutes, same neighbours), then the median.
        ratios = [(g[key] / s[key]) if invert else (s[key] / g[key]) for s, g in zip(s_runs, g_runs)]
        return statistics.median(ratios), min(ratios), max(ratios)

    rows = ["| variant | slmedge decode tok/s | GenAI decode tok/s | decode ratio slmedge/GenAI "
            "(per-round median [min-max]) | slmedge TTFT ms | GenAI TTFT ms | TTFT ratio GenAI/slmedge "
            "(per-round median [min-max]) | slmedge MB | GenAI MB |",
            "|---|---|---|---|---|---|---|---|---|"]
    for v in variants:
        s, g = results["slmedge"][v.name], results["genai"][v.genai_precision]
        sd, gd = med("decode_tokens_per_s", s["runs"]), med("decode_tokens_per_s", g["runs"])
        st, gt = med("ttft_ms", s["runs"]), med("ttft_ms", g["runs"])
        dr = paired("decode_tokens_per_s", s["runs"], g["runs"])
        tr = paired("ttft_ms", s["runs"], g["runs"], invert=True)
        rows.append(f"| {v.name} | {sd:.1f} | {gd:.1f} (GenAI {v.genai_precision}) "
                    f"| {dr[0]:.2f}x [{dr[1]:.2f}-{dr[2]:.2f}] | {st:.0f} | {gt:.0f} "
                    f"| {tr[0]:.2f}x [{tr[1]:.2f}-{tr[2]:.2f}] | {s['size_mb']} | {g['size_mb']} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="fp32",
                   help=f"comma-separated, from: {', '.join(VARIANTS)} (default fp32)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    p.add_argument("--repeats", type=int, default=2, help="measured generations per round and tool")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    p.add_argument("--source", default=DEFAULT_SOURCE)
    p.add_argument("--slmedge-artifact", action="append", default=[], metavar="VARIANT=DIR",
                   help="use an existing slmedge artifact for a variant instead of exporting")
    p.add_argument("--json", type=Path, help="write the results here (default WORKDIR/bench_genai.json)")
    # child mode (internal)
    p.add_argument("--child", choices=["slmedge", "genai"], help=argparse.SUPPRESS)
    p.add_argument("child_path", nargs="?", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--prompt-file", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        prompt = json.loads(args.prompt_file.read_text())
        fn = child_slmedge if args.child == "slmedge" else child_genai
        print(json.dumps(fn(args.child_path, prompt, args.new_tokens, args.threads, args.repeats)))
        return 0

    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    variants = [VARIANTS[n] for n in names]
    overrides = dict(item.split("=", 1) for item in args.slmedge_artifact)
    args.workdir.mkdir(parents=True, exist_ok=True)
    hf_dir = prepare_hf_dir(args.workdir, args.source)

    from slmedge.runtimes.bench.runner import bench_prompt_ids

    vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    prompt = bench_prompt_ids(vocab, args.prompt_tokens)
    prompt_file = args.workdir / "bench_genai_prompt.json"
    prompt_file.write_text(json.dumps(prompt))

    entries: list[Entry] = []
    for v in variants:
        path = Path(overrides[v.name]) if v.name in overrides else prepare_slmedge(args.workdir, hf_dir, v)
        entries.append(Entry("slmedge", v.name, path))
    for precision in dict.fromkeys(v.genai_precision for v in variants):
        v = next(v for v in variants if v.genai_precision == precision)
        entries.append(Entry("genai", precision, prepare_genai(args.workdir, hf_dir, v, args.threads)))

    results: dict = {"slmedge": {}, "genai": {}}
    for e in entries:
        results[e.tool][e.label] = {"path": str(e.path), "size_mb": size_mb(e.path), "runs": []}
    for r in range(args.rounds):
        order = entries if r % 2 == 0 else entries[::-1]  # alternate who goes first
        for e in order:
            say(f"round {r + 1}/{args.rounds}: {e.tool} {e.label}")
            run = measure(e, prompt_file, args)
            say(f"  decode {run['decode_tokens_per_s']:.1f} tok/s, TTFT {run['ttft_ms']:.0f} ms")
            results[e.tool][e.label]["runs"].append(run)

    from slmedge.runtimes.bench.runner import environment

    doc = {
        "what": "slmedge vs ONNX Runtime GenAI model builder, same weights, same prompt ids",
        "source": args.source,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "rounds": args.rounds,
        "repeats_per_round": args.repeats,
        "environment": environment(args.threads, ["CPUExecutionProvider"]),
        "load_average_at_end": os.getloadavg(),
        "results": results,
        "table": table(results, variants),
    }
    out = args.json or args.workdir / "bench_genai.json"
    out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(doc["table"])
    print(f"\n(median over {args.rounds} alternating rounds x {args.repeats} runs; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; JSON: {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
