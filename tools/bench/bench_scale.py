"""Export memory and time at real model sizes: slmedge vs ONNX Runtime GenAI's builder (issue 15).

    python tools/bench/bench_scale.py [--models qwen2.5-0.5b,llama-3.2-1b] [--precisions fp16,int4]
                                      [--tools slmedge,genai] [--json out.json] [--cap-gb 20]
                                      [--source HEAD] [--keep-outputs]

For each model: a random-weight checkpoint with the real config's shapes (:data:`CONFIGS`,
the public config.json values) is written once under ``artifacts/scale/<model>/hf`` as bf16
safetensors, shard by shard (each tensor drawn from a seeded generator; the whole model is
never in memory), then each (tool, precision) exports it in its own process, one at a time:
wall time, the process's own peak RSS (``os.wait4``'s ru_maxrss of the child, which covers
the children it waited for), the output's size, the load average before and after, and
slmedge's own phase timings (manifest ``timings_s``). Each output is deleted once measured
(``--keep-outputs`` keeps them). Prints a side-by-side table with the slmedge/GenAI ratios;
``--json`` is updated after every row (rows of other runs in the file are kept), so tools and
models can be measured in separate invocations.

Safety on a shared machine: before each export it waits until ``--wait-gb`` is available
(default: the cap for 2.5B+ models), and a watchdog kills the export's whole process group
when the tree's RSS passes ``--cap-gb`` (default 20) or the machine's MemAvailable drops
below ``--floor-gb``; the row then says "killed at cap N GB".

slmedge runs from ``git archive <--source>`` (default HEAD) unpacked under the workdir, not
from the working tree (other people's uncommitted edits are not measured); the row records
the commit.

Targets (issue 15): 8B int4 <= 16 GB peak, 3B int4 <= 8 GB, fp16 peak <= output + 2 GB,
and not slower than GenAI's builder on the same checkpoint.
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


def _children_map() -> dict[int, list[int]]:
    """ppid -> [pid] of every process visible in /proc (a snapshot)."""
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # exited meanwhile
            continue
        # the command name (field 2) may hold spaces and parentheses: split after the last ')'
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants (each process's VmRSS, summed: shared
    pages count once per process, so this errs high, on the safe side for a cap)."""
    kids = _children_map()
    todo, total, page = [pid], 0, os.sysconf("SC_PAGE_SIZE")
    while todo:
        p = todo.pop()
        todo.extend(kids.get(p, []))
        try:
            with open(f"/proc/{p}/statm", "rb") as f:
                total += int(f.read().split()[1]) * page
        except OSError:
            pass
    return total


def mem_available_bytes() -> int:
    """The kernel's estimate of memory available to new work (``free``'s "available")."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable line (kernel older than 3.14?)")


def wait_for_memory(need_gb: float, max_wait_s: float, poll_s: float = 10.0) -> dict:
    """Block until MemAvailable >= ``need_gb`` (other helpers' jobs share the machine), at
    most ``max_wait_s``; says how long it waited and what was available when it gave up."""
    t0 = time.monotonic()
    while True:
        avail = mem_available_bytes() / 1e9
        waited = time.monotonic() - t0
        if avail >= need_gb or waited >= max_wait_s:
            return {"needed_gb": need_gb, "available_gb": round(avail, 1),
                    "waited_s": round(waited), "satisfied": avail >= need_gb}
        say(f"waiting for {need_gb:.0f} GB available (now {avail:.1f} GB, {waited:.0f} s so far)")
        time.sleep(poll_s)


def run_measured(cmd: list[str], log: Path, cap_gb: float = 20.0, floor_gb: float = 1.0,
                 poll_s: float = 0.5, env: dict | None = None,
                 timeout_s: float | None = None) -> dict:
    """Run ``cmd`` as a child in its own process group; its wall time, exit code and own peak
    RSS (``wait4``'s ru_maxrss, which covers the descendants it waited for).

    A watchdog polls the RSS of the child's whole process tree every ``poll_s`` seconds and
    kills the group (SIGKILL) when it passes ``cap_gb``, or when the machine's MemAvailable
    drops below ``floor_gb`` (another job is growing too: better lose this row than let the OOM
    killer pick someone else's process), or after ``timeout_s`` seconds. ``killed`` then says
    why, and ``peak_tree_rss_gb`` is the largest tree RSS the watchdog saw."""
    import signal
    import threading

    state = {"killed": None, "peak_tree": 0}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env=env)
        done = threading.Event()

        def watch() -> None:
            while not done.wait(poll_s):
                rss = tree_rss_bytes(proc.pid)
                state["peak_tree"] = max(state["peak_tree"], rss)
                reason = None
                if rss > cap_gb * 1e9:
                    reason = f"killed at cap {cap_gb:g} GB"
                elif mem_available_bytes() < floor_gb * 1e9:
                    reason = (f"killed: machine MemAvailable below {floor_gb:g} GB (this tree "
                              f"{rss / 1e9:.1f} GB; other jobs hold the rest)")
                elif timeout_s is not None and time.perf_counter() - t0 > timeout_s:
                    reason = f"killed at timeout {timeout_s:g} s"
                if reason:
                    state["killed"] = reason
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)  # the group this call created
                    except ProcessLookupError:
                        pass
                    return

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
        watcher.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    return {"exit_code": proc.returncode, "wall_s": round(wall, 1),
            "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 2),
            "peak_tree_rss_gb": round(state["peak_tree"] / 1e9, 2),
            "killed": state["killed"]}


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def export_command(tool: str, precision: str, hf_dir: Path, out: Path, eval_tokens: int) -> list[str]:
    if tool == "slmedge":
        # Random weights: the next-token distributions are near-flat, so top-1 agreement and
        # KL mean little (the 0.5B int4's top-1 is ~39%), and perplexity barely more (the 3B int4
        # rose 5.9% on its near-flat distributions): the gate is opened; the card is still measured.
        flags = (["--dtype", "fp16"] if precision == "fp16" else
                 ["--quant", precision, "--max-kl-mean", "10", "--min-top1-agreement", "0",
                  "--max-ppl-increase", "100"])
        return [sys.executable, "-m", "slmedge.tools.cli", "export", "--model", str(hf_dir),
                "--output", str(out), "--overwrite", "--json", "--eval-tokens", str(eval_tokens),
                *flags]
    return [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir),
            "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(out.parent / "genai-cache")]


def source_snapshot(commit: str, workdir: Path) -> tuple[str, Path]:
    """The committed slmedge packages at ``commit`` (``git archive``, not the working tree that
    other people are editing) unpacked as ``<root>/slmedge/{exporter,runtimes,...}``; with
    ``<root>`` first on PYTHONPATH, ``python -m slmedge.tools.cli`` imports them (the editable
    install's finder comes after the path finder). Returns (full commit hash, root)."""
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", f"{commit}^{{commit}}"],
                         check=True, capture_output=True, text=True).stdout.strip()
    root = Path(workdir) / f"src-{sha[:12]}"
    pkg = root / "slmedge"
    if not (pkg / "tools" / "__init__.py").exists():
        pkg.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", sha, *PACKAGES],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(pkg)], input=archive, check=True)
    return sha, root


PACKAGES = ("exporter", "runtimes", "device_profiles", "tools")


def snapshot_env(root: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    where = subprocess.run([sys.executable, "-c", "import slmedge.exporter as e; print(e.__file__)"],
                           env=env, check=True, capture_output=True, text=True).stdout.strip()
    if not where.startswith(str(root)):
        raise RuntimeError(f"slmedge.exporter imports from {where}, not from the snapshot {root}: "
                           "the editable install's finder shadows PYTHONPATH; run with --source "
                           "worktree or fix the import order")
    return env


def load_rows(path: Path | None) -> list[dict]:
    if path and path.exists():
        return json.loads(path.read_text())["rows"]
    return []


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` with each (model, precision, tool) that ``new`` measured again replaced."""
    key = lambda r: (r["model"], r["precision"], r["tool"])  # noqa: E731
    fresh = {key(r) for r in new}
    return [r for r in old if key(r) not in fresh] + new


def write_json(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"rows": rows, "table": table(rows), "targets": targets(rows)},
                              indent=1) + "\n")
    tmp.replace(path)


def bench(models: list[str], precisions: list[str], tools: list[str], workdir: Path,
          eval_tokens: int, *, cap_gb: float = 20.0, floor_gb: float = 1.0,
          wait_gb: float | None = None, max_wait_s: float = 900.0, keep_outputs: bool = False,
          source: str = "HEAD", json_path: Path | None = None,
          previous: list[dict] | None = None, timeout_s: float | None = None) -> list[dict]:
    """Measure each (model, precision, tool), one process at a time; each row is merged into
    ``previous`` and written to ``json_path`` as soon as it is measured (a later crash or kill
    loses nothing)."""
    import shutil

    env, commit = None, None
    if "slmedge" in tools:
        if source == "worktree":
            dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", *PACKAGES],
                                   capture_output=True, text=True).stdout.splitlines()
            commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"],
                                    capture_output=True, text=True).stdout.strip()
            commit += f" + {len(dirty)} uncommitted file(s)" if dirty else ""
        else:
            commit, root = source_snapshot(source, workdir)
            env = snapshot_env(root)
        say(f"slmedge code: {commit}")
    all_rows = list(previous or [])
    rows = []
    for name in models:
        hf_dir = write_random_checkpoint(name, workdir / name / "hf")
        params = parameter_count(name)
        for precision in precisions:
            for tool in tools:
                out = workdir / name / f"{tool}-{precision}"
                shutil.rmtree(out, ignore_errors=True)
                need = wait_gb if wait_gb is not None else (cap_gb if params >= 2.5e9
                                                            else min(cap_gb, 8.0))
                memory = wait_for_memory(need, max_wait_s)
                say(f"{name} {precision} {tool} ... ({memory['available_gb']} GB available)")
                load_start = [round(x, 2) for x in os.getloadavg()]
                result = run_measured(export_command(tool, precision, hf_dir, out, eval_tokens),
                                      workdir / name / f"{tool}-{precision}.log", cap_gb=cap_gb,
                                      floor_gb=floor_gb, timeout_s=timeout_s,
                                      env=env if tool == "slmedge" else None)
                row = {"model": name, "parameters": params, "precision": precision,
                       "tool": tool, **result,
                       "output_gb": (round(dir_size(out) / 1e9, 3)
                                     if out.exists() and result["exit_code"] == 0 else None),
                       "loadavg_start": load_start,
                       "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                       "memory_before": memory, "cap_gb": cap_gb,
                       "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "log": str(workdir / name / f"{tool}-{precision}.log")}
                if tool == "slmedge":
                    row["slmedge_commit"] = commit
                    if (out / "manifest.json").exists():
                        manifest = json.loads((out / "manifest.json").read_text())
                        row["parity"] = manifest.get("verification", {}).get("parity")
                        # export = trace + write; the rest of total is verification (parity
                        # gate, tokenizer check, quality card), which GenAI's builder does not do
                        row["slmedge_timings_s"] = manifest.get("timings_s")
                        row["slmedge_phases_s"] = slmedge_phases(manifest)
                else:
                    import importlib.metadata as md

                    row["genai_version"] = md.version("onnxruntime-genai")
                say(json.dumps(row))
                rows.append(row)
                # the file as it is now: a run waits (bigmem lock) and measures for minutes,
                # and rows others wrote meanwhile must not be replaced by the ones read at start
                # (a 3B row written at 09:15 put back two 1B rows re-measured at 09:03)
                all_rows = merge_rows(load_rows(json_path) if json_path else all_rows, [row])
                if json_path:
                    write_json(json_path, all_rows)
                shutil.rmtree(workdir / name / "genai-cache", ignore_errors=True)
                if not keep_outputs:  # disk: outputs are measured, not kept
                    shutil.rmtree(out, ignore_errors=True)
    return rows


def slmedge_phases(manifest: dict) -> dict:
    """Seconds per phase of a slmedge export, from its manifest: ``timings_s`` (load, export
    and whatever phases the exporter adds there), the quantizer's and the quality card's own
    ``seconds``, and ``other`` = total - the rest (parity gate, tokenizer check, writing)."""
    timings = dict(manifest.get("timings_s") or {})
    total = timings.pop("total", None)
    phases = {k: v for k, v in timings.items() if isinstance(v, (int, float))}
    for key, section in (("quantize", "quantization"), ("quality_card", "quality")):
        seconds = (manifest.get(section) or {}).get("seconds")
        if isinstance(seconds, (int, float)):
            phases[key] = round(seconds, 2)
    if total is not None:
        # "export" already spans trace/passes/write; newer exporters time the quantizer + card
        # ("quantize_and_card") or the card ("card") themselves: count each second once
        inside = {"trace", "passes", "write"}
        if "quantize_and_card" in timings or "card" in timings:
            inside |= {"quantize", "quality_card"}
        parts = [v for k, v in phases.items() if k not in inside]
        phases["other"] = round(total - sum(parts), 2)
        phases["total"] = total
    return phases


def _cell(r: dict) -> str:
    if r["exit_code"] == 0 and r["output_gb"] is not None:
        return f"{r['wall_s']:.0f} s / {r['peak_rss_gb']:.1f} GB / {r['output_gb']:.2f} GB"
    why = r.get("killed") or f"exit {r['exit_code']}"
    return f"{why} after {r['wall_s']:.0f} s ({r['peak_rss_gb']:.1f} GB)"


def table(rows: list[dict]) -> str:
    """Markdown: one line per (model, precision), both tools side by side, slmedge/GenAI."""
    lines = ["| model | params | precision | slmedge wall / peak / output | GenAI wall / peak / output"
             " | wall ratio | peak ratio |", "|---|---|---|---|---|---|---|"]
    keys = sorted({(r["model"], r["precision"]) for r in rows},
                  key=lambda k: (list(CONFIGS).index(k[0]), k[1]))
    for model, precision in keys:
        by_tool = {r["tool"]: r for r in rows if (r["model"], r["precision"]) == (model, precision)}
        s, g = by_tool.get("slmedge"), by_tool.get("genai")
        both = s and g and s["exit_code"] == 0 and g["exit_code"] == 0
        wall = f"{s['wall_s'] / g['wall_s']:.2f}x" if both else "—"
        peak = f"{s['peak_rss_gb'] / g['peak_rss_gb']:.2f}x" if both else "—"
        params = next(r["parameters"] for r in rows if r["model"] == model) / 1e9
        lines.append(f"| {model} | {params:.2f}B | {precision} | "
                     f"{_cell(s) if s else '—'} | {_cell(g) if g else '—'} | {wall} | {peak} |")
    return "\n".join(lines)


#: Peak-memory targets of int4 exports (issue 15), GB, by model.
INT4_PEAK_TARGETS_GB = {"llama-3.2-3b": 8.0, "llama-3.1-8b": 16.0}
FP16_HEADROOM_GB = 2.0  # fp16 export peak <= output size + this


def targets(rows: list[dict]) -> list[str]:
    """One line per issue-15 target a slmedge row can be judged on: met / not met, with the
    numbers (a killed or failed row does not meet its targets)."""
    out = []
    by = {(r["model"], r["precision"], r["tool"]): r for r in rows}
    for (model, precision, tool), r in sorted(
            by.items(), key=lambda kv: (list(CONFIGS).index(kv[0][0]), kv[0][1])):
        if tool != "slmedge":
            continue
        ok = r["exit_code"] == 0 and r.get("output_gb") is not None
        what = f"{model} {precision}"
        if not ok:
            out.append(f"{what}: not met, no artifact ({r.get('killed') or 'exit ' + str(r['exit_code'])})")
            continue
        limit = INT4_PEAK_TARGETS_GB.get(model) if precision == "int4" else None
        if limit is not None:
            verdict = "met" if r["peak_rss_gb"] <= limit else "not met"
            out.append(f"{what}: peak {r['peak_rss_gb']:.1f} GB <= {limit:g} GB: {verdict}")
        if precision == "fp16":
            limit = r["output_gb"] + FP16_HEADROOM_GB
            verdict = "met" if r["peak_rss_gb"] <= limit else "not met"
            out.append(f"{what}: peak {r['peak_rss_gb']:.1f} GB <= output {r['output_gb']:.2f} "
                       f"+ {FP16_HEADROOM_GB:g} GB: {verdict}")
        g = by.get((model, precision, "genai"))
        if g and g["exit_code"] == 0:
            verdict = "met" if r["wall_s"] <= g["wall_s"] else "not met"
            out.append(f"{what}: wall {r['wall_s']:.0f} s <= GenAI's {g['wall_s']:.0f} s: {verdict}")
        elif g:
            out.append(f"{what}: GenAI's builder did not finish "
                       f"({g.get('killed') or 'exit ' + str(g['exit_code'])}): slmedge "
                       f"{r['wall_s']:.0f} s, no speed comparison")
    return out


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
    ap.add_argument("--cap-gb", type=float, default=20.0,
                    help="kill a measured export when its process tree's RSS passes this "
                    "(default 20: the machine has 24 GB, shared)")
    ap.add_argument("--floor-gb", type=float, default=1.0,
                    help="also kill it when the machine's MemAvailable drops below this")
    ap.add_argument("--wait-gb", type=float, default=None,
                    help="before each export wait until this much memory is available (default:"
                    " the cap for models of 2.5B+ parameters, min(cap, 8) below)")
    ap.add_argument("--max-wait", type=float, default=900.0,
                    help="seconds to wait for --wait-gb before running anyway (the watchdog "
                    "still guards)")
    ap.add_argument("--source", default="HEAD",
                    help="slmedge code to run: a commit (default HEAD, unpacked with git archive,"
                    " so other people's uncommitted edits are not measured) or 'worktree'")
    ap.add_argument("--timeout", type=float, default=None,
                    help="kill an export after this many seconds (the row says so)")
    ap.add_argument("--keep-outputs", action="store_true",
                    help="keep each export's output (default: deleted once measured)")
    ap.add_argument("--json", type=Path,
                    help="write the rows and the table here; rows already in the file are kept "
                    "unless measured again (same model, precision, tool)")
    args = ap.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in CONFIGS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; known: {', '.join(CONFIGS)}")
    tools = [t for t in args.tools.split(",") if t]
    if set(tools) - {"slmedge", "genai"}:
        ap.error(f"unknown tool(s) {sorted(set(tools) - {'slmedge', 'genai'})}; known: slmedge, genai")
    previous = load_rows(args.json)
    rows = bench(models, args.precisions.split(","), tools, args.workdir, args.eval_tokens,
                 cap_gb=args.cap_gb, floor_gb=args.floor_gb, wait_gb=args.wait_gb,
                 max_wait_s=args.max_wait, keep_outputs=args.keep_outputs, source=args.source,
                 json_path=args.json, previous=previous, timeout_s=args.timeout)
    merged = merge_rows(load_rows(args.json), rows)
    print(table(merged))
    print("\n".join(targets(merged)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
