"""Export memory and time at real model sizes: slmedge vs ONNX Runtime GenAI's builder (issue 15).

    python tools/bench/bench_scale.py [--models qwen2.5-0.5b,llama-3.2-1b] [--precisions fp16,int4]
                                      [--tools slmedge,genai] [--json out.json]

For each model: a random-weight checkpoint with the real config's shapes (:data:`CONFIGS`,
the public config.json values) is written once under ``artifacts/scale/<model>/hf`` as bf16
safetensors, shard by shard (each tensor drawn from a seeded generator; the whole model is
never in memory), then each (tool, precision) exports it in its own process, one at a time:
wall time, the process's own peak RSS (``os.wait4``'s ru_maxrss of the child, which covers
the children it waited for), and the output's size. Prints a side-by-side table with the
slmedge/GenAI ratios and writes JSON.

Targets (issue 15): 8B int4 <= 16 GB peak, 3B int4 <= 8 GB, fp16 peak <= output + 2 GB,
and not slower than GenAI's builder on the same checkpoint.

Never run it beside another benchmark, and check ``free -g`` before the large sizes: the
machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_WORKDIR = REPO / "artifacts" / "scale"

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "high_freq_factor": 4.0,
                "low_freq_factor": 1.0, "original_max_position_embeddings": 8192}

#: Shapes of the public config.json of each model (no weights are downloaded).
CONFIGS: dict[str, dict] = {
    "qwen2.5-0.5b": dict(
        model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=896,
        intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        use_sliding_window=False, sliding_window=32768, max_window_layers=21,
        hidden_act="silu", bos_token_id=151643, eos_token_id=151643),
    "llama-3.2-1b": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=2048,
        intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
        rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE, rms_norm_eps=1e-5,
        tie_word_embeddings=True, hidden_act="silu", bos_token_id=128000, eos_token_id=128001),
    "llama-3.2-3b": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=3072,
        intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
        rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE, rms_norm_eps=1e-5,
        tie_word_embeddings=True, hidden_act="silu", bos_token_id=128000, eos_token_id=128001),
    "phi-3-mini": dict(
        model_type="phi3", architectures=["Phi3ForCausalLM"], hidden_size=3072,
        intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096,
        original_max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
        sliding_window=2047, tie_word_embeddings=False, hidden_act="silu", bos_token_id=1,
        eos_token_id=32000, pad_token_id=32000),
    "llama-3.1-8b": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
        rope_theta=500000.0, rope_scaling={**_LLAMA3_ROPE, "factor": 8.0}, rms_norm_eps=1e-5,
        tie_word_embeddings=False, hidden_act="silu", bos_token_id=128000, eos_token_id=128001),
}
SHARD_BYTES = 1 << 29  # at most ~0.5 GB of bf16 (and its fp32 draws) in memory
INIT_STD = 0.02  # transformers' initializer_range: logits of a sane scale
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n'"
    " }}{% endif %}"
)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def hf_config(name: str):
    from transformers import AutoConfig

    values = dict(CONFIGS[name])
    return AutoConfig.for_model(values.pop("model_type"), **values)


def checkpoint_tensors(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor ``save_pretrained`` would write (tied ones once), from a
    model built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    seen: set[int] = set()
    out = []
    for name, param in model.named_parameters():  # duplicates (tied) are left out
        if id(param) not in seen:
            seen.add(id(param))
            out.append((name, tuple(param.shape)))
    return out


def _tokenizer():
    """A small BPE tokenizer with ChatML special tokens (ids far below any real vocab)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["It is a truth universally acknowledged, that a single man in possession of a good "
            "fortune, must be in want of a wife. The quick brown fox jumps over the lazy dog."] * 4
    trainer = trainers.BpeTrainer(vocab_size=512, show_progress=False,
                                  special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>",
                                                  "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHATML
    return fast


def write_random_checkpoint(name: str, directory: Path, seed: int = 0) -> Path:
    """A bf16 safetensors checkpoint of ``CONFIGS[name]``'s shapes with seeded random weights,
    written shard by shard (at most one ~1 GB shard in memory). Idempotent."""
    import torch
    from safetensors.torch import save_file

    directory = Path(directory)
    index_path = directory / "model.safetensors.index.json"
    if index_path.exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    config = hf_config(name)
    tensors = checkpoint_tensors(config)
    generator = torch.Generator().manual_seed(seed)
    shards: list[list[tuple[str, tuple]]] = [[]]
    size = 0
    for tensor_name, shape in tensors:
        nbytes = 2 * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((tensor_name, shape))
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        data = {}
        for tensor_name, shape in shard:
            if len(shape) == 1:  # norms (weights near 1) and biases (near 0)
                base = 0.0 if tensor_name.endswith("bias") else 1.0
                t = base + INIT_STD * torch.randn(shape, generator=generator)
            else:
                t = INIT_STD * torch.randn(shape, generator=generator)
            data[tensor_name] = t.to(torch.bfloat16)
            weight_map[tensor_name] = file
            total += data[tensor_name].numel() * 2
        save_file(data, str(directory / file), metadata={"format": "pt"})
        del data
        say(f"{name}: wrote shard {i + 1}/{len(shards)}")
    config.dtype = torch.bfloat16
    config.save_pretrained(str(directory))
    _tokenizer().save_pretrained(str(directory))
    index_path.write_text(json.dumps({"metadata": {"total_size": total},
                                      "weight_map": weight_map}, indent=1))
    return directory


def parameter_count(name: str) -> int:
    import math

    return sum(math.prod(shape) for _, shape in checkpoint_tensors(hf_config(name)))


def run_measured(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` as a child; its wall time, exit code and own peak RSS (wait4)."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    return {"exit_code": code, "wall_s": round(wall, 1),
            "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 2)}


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def export_command(tool: str, precision: str, hf_dir: Path, out: Path, eval_tokens: int) -> list[str]:
    if tool == "slmedge":
        flags = ["--dtype", "fp16"] if precision == "fp16" else ["--quant", precision]
        return [sys.executable, "-m", "slmedge.tools.cli", "export", "--model", str(hf_dir),
                "--output", str(out), "--overwrite", "--json", "--eval-tokens", str(eval_tokens),
                *flags]
    return [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir),
            "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(out.parent / "genai-cache")]


def bench(models: list[str], precisions: list[str], tools: list[str], workdir: Path,
          eval_tokens: int) -> list[dict]:
    import shutil

    rows = []
    for name in models:
        hf_dir = write_random_checkpoint(name, workdir / name / "hf")
        params = parameter_count(name)
        for precision in precisions:
            for tool in tools:
                out = workdir / name / f"{tool}-{precision}"
                shutil.rmtree(out, ignore_errors=True)
                say(f"{name} {precision} {tool} ...")
                result = run_measured(export_command(tool, precision, hf_dir, out, eval_tokens),
                                      workdir / name / f"{tool}-{precision}.log")
                row = {"model": name, "parameters": params, "precision": precision,
                       "tool": tool, **result,
                       "output_gb": round(dir_size(out) / 1e9, 3) if out.exists() else None}
                if tool == "slmedge" and (out / "manifest.json").exists():
                    manifest = json.loads((out / "manifest.json").read_text())
                    row["parity"] = manifest["verification"]["parity"]
                    # export = trace + write; the rest of total is verification (parity gate,
                    # tokenizer check, quality card), which GenAI's builder does not do
                    row["slmedge_timings_s"] = manifest.get("timings_s")
                say(json.dumps(row))
                rows.append(row)
                shutil.rmtree(workdir / name / "genai-cache", ignore_errors=True)
                shutil.rmtree(out, ignore_errors=True)  # disk: outputs are measured, not kept
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: one line per (model, precision), both tools side by side, slmedge/GenAI."""
    lines = ["| model | params | precision | slmedge wall / peak / output | GenAI wall / peak / output"
             " | wall ratio | peak ratio |", "|---|---|---|---|---|---|---|"]
    keys = sorted({(r["model"], r["precision"]) for r in rows},
                  key=lambda k: (list(CONFIGS).index(k[0]), k[1]))
    for model, precision in keys:
        cell, by_tool = {}, {}
        for r in rows:
            if (r["model"], r["precision"]) == (model, precision):
                by_tool[r["tool"]] = r
                ok = r["exit_code"] == 0
                cell[r["tool"]] = (f"{r['wall_s']:.0f} s / {r['peak_rss_gb']:.1f} GB / "
                                   f"{r['output_gb']:.2f} GB" if ok and r["output_gb"] is not None
                                   else f"exit {r['exit_code']} after {r['wall_s']:.0f} s, "
                                   f"{r['peak_rss_gb']:.1f} GB")
        s, g = by_tool.get("slmedge"), by_tool.get("genai")
        both = s and g and s["exit_code"] == 0 and g["exit_code"] == 0
        wall = f"{s['wall_s'] / g['wall_s']:.2f}x" if both else "—"
        peak = f"{s['peak_rss_gb'] / g['peak_rss_gb']:.2f}x" if both else "—"
        params = next(r["parameters"] for r in rows if r["model"] == model) / 1e9
        lines.append(f"| {model} | {params:.2f}B | {precision} | {cell.get('slmedge', '—')} | "
                     f"{cell.get('genai', '—')} | {wall} | {peak} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="qwen2.5-0.5b,llama-3.2-1b",
                    help=f"comma-separated, from: {', '.join(CONFIGS)}")
    ap.add_argument("--precisions", default="fp16,int4")
    ap.add_argument("--tools", default="slmedge,genai")
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    ap.add_argument("--eval-tokens", type=int, default=256,
                    help="slmedge's quality card: tokens scored (kept small: memory and time of "
                    "the export are measured, the card's figures mean nothing on random weights)")
    ap.add_argument("--json", type=Path, help="write the rows and the table here")
    args = ap.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in CONFIGS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; known: {', '.join(CONFIGS)}")
    rows = bench(models, args.precisions.split(","), args.tools.split(","), args.workdir,
                 args.eval_tokens)
    text = table(rows)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "table": text}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
