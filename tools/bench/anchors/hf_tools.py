"""The Hugging Face side of ``tools/bench/bench_anchors.py``: the model as a plain HF directory,
the Optimum venv and export, and one timed ``generate`` (``run_hf.py``) with PyTorch eager
or Optimum's ``ORTModelForCausalLM``."""

from __future__ import annotations

import json
import shutil
import sys
from importlib import metadata
from pathlib import Path

from .runner import ANCHORS, Runner, StepFailed, rel

# The Optimum venv. torch is installed first and on its own, pinned: an unpinned torch
# (optimum depends on "torch>=1.11") resolves to a multi-GB CUDA build; 2.13.0 is a CPU
# build. It stays pinned in the second install so that pip fails rather than replace it.
# The rest are the versions optimum-onnx 0.1.0 resolved to here (it asks optimum~=2.1.0,
# transformers>=4.36,<4.58); onnxruntime is the main venv's, so both ONNX tools run on
# the same ORT and differ only in the graph and the loop around it.
TORCH_PIN = "torch==2.13.0"
OPTIMUM_PINS = ("optimum-onnx==0.1.0", "optimum==2.1.0", "transformers==4.57.6")

def prepare_hf_dir(run: Runner, model: str, out: Path) -> dict:
    """The model as a plain fp32 HF directory that transformers 4.57 and 5.x both read."""
    info = run.run_json(
        "hf-weights", [sys.executable, ANCHORS / "prepare_hf.py", "--model", model, "--output", out]
    )
    info.pop("_peak_rss_mb_wait4", None)
    return info


def ensure_optimum_venv(run: Runner, venv: Path) -> Path:
    """Create (or complete) the Optimum venv; returns its python. Idempotent."""
    python = venv / "bin" / "python"
    ort_version = metadata.version("onnxruntime")
    requirements = [TORCH_PIN, *OPTIMUM_PINS, f"onnxruntime=={ort_version}"]
    marker = venv / "slmedge-anchors-venv.json"
    if python.exists() and marker.exists():
        try:
            if json.loads(marker.read_text()).get("requirements") == requirements:
                return python
        except json.JSONDecodeError:
            pass
    run.say(f"building {rel(venv)} ({', '.join(requirements)}); this takes minutes")
    if not python.exists():
        run.run("optimum-venv", [sys.executable, "-m", "venv", venv], timeout=600)
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check", "--quiet"]
    run.run("optimum-venv", [*pip, TORCH_PIN])
    run.run("optimum-venv", [*pip, *requirements])
    marker.write_text(json.dumps({"requirements": requirements}, indent=2) + "\n")
    return python


def export_optimum(run: Runner, python: Path, hf_dir: Path, out: Path) -> dict:
    """``optimum-cli export onnx --task text-generation-with-past`` of the HF directory."""
    marker = out / "slmedge-anchors-export.json"
    source = json.loads((hf_dir / "slmedge-anchors-source.json").read_text())
    if marker.exists() and json.loads(marker.read_text()).get("source") == source:
        return {"output": str(out), "cached": True}
    run.say(f"exporting with optimum-cli -> {rel(out)}")
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    cli = python.parent / "optimum-cli"
    try:
        run.run(
            "optimum-export",
            [cli, "export", "onnx", "--model", hf_dir, "--task", "text-generation-with-past", tmp],
        )
        if not (tmp / "model.onnx").exists():
            raise StepFailed("optimum-export", f"optimum-cli wrote no model.onnx in {tmp}")
        (tmp / marker.name).write_text(json.dumps({"source": source}, indent=2) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"output": str(out), "cached": False}


def measure_hf(run: Runner, tool: str, python: Path | str, model_dir: Path, prompt_file: Path,
               args, label: str) -> tuple[dict, dict]:
    """One ``run_hf.py`` process (``tool``: pytorch or optimum): load, warm up, one timed
    generation of the prompt in ``prompt_file``. Returns (kept fields, full result)."""
    r = run.run_json(
        f"{label}-{tool}",
        [
            python,
            ANCHORS / "run_hf.py",
            "--backend",
            tool,
            "--model-dir",
            model_dir,
            "--prompt-file",
            prompt_file,
            "--new-tokens",
            args.new_tokens,
            "--threads",
            args.threads,
            "--warmup",
            args.warmup,
        ],
    )
    keep = (
        "load_s",
        "ttft_ms",
        "decode_tokens_per_s",
        "peak_rss_mb",
        "model_size_mb",
        "decode_ms_p50",
        "tokens",
        "use_io_binding",
    )
    return {k: r[k] for k in keep if k in r}, r
