"""The slmedge side of ``tools/bench/bench_anchors.py``: its export (cached while the exporter's
code and stack are unchanged) and one ``slmedge bench`` measurement."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from .runner import Runner, rel, slmedge_command, venv_versions


def exporter_source_key(package_dir: Path, versions: dict[str, str]) -> str:
    """A fingerprint of the exporter's code and stack: a changed exporter means re-export."""
    h = hashlib.sha256(json.dumps(versions, sort_keys=True).encode())
    for path in sorted(package_dir.rglob("*.py")):
        h.update(str(path.relative_to(package_dir)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def export_slmedge(run: Runner, model: str, out: Path) -> dict:
    """``slmedge export`` of ``model`` (fp32), redone when the exporter code has changed."""
    from importlib.util import find_spec

    spec = find_spec("slmedge.exporter")
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    stack = {k: v for k, v in venv_versions(sys.executable).items() if k != "optimum"}
    key = exporter_source_key(package_dir, stack)
    key_file = out.parent / f"{out.name}.source-key"
    if (out / "manifest.json").exists() and key_file.exists() and key_file.read_text() == key:
        return {"output": str(out), "cached": True}
    key_file.unlink(missing_ok=True)
    run.say(f"exporting {model} with slmedge (fp32) -> {rel(out)}")
    run.run(
        "slmedge-export",
        [slmedge_command(), "export", "--model", model, "--output", out, "--overwrite", "--json"],
    )
    key_file.write_text(key)
    return {"output": str(out), "cached": False}


def manifest_summary(artifact: Path) -> dict:
    """What the slmedge artifact is: how it was made, its recipe and graph size."""
    try:
        m = json.loads((artifact / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    onnx = m.get("onnx") or {}
    return {
        "command": m.get("command"),
        "created_at": m.get("created_at"),
        "recipe": m.get("recipe"),
        "nodes": onnx.get("nodes"),
        "ops": onnx.get("ops"),
    }


def measure_slmedge(run: Runner, artifact: Path, args, label: str) -> tuple[dict, dict]:
    """One ``slmedge bench`` process on ``artifact``: load, warm up, one timed generation,
    at the one prompt length the other tools run. Returns (kept fields, full result)."""
    r = run.run_json(
        f"{label}-slmedge",
        [
            slmedge_command(),
            "bench",
            artifact,
            "--json",
            "--prompt-tokens",
            args.prompt_tokens,
            "--repeats",
            1,
            # Only the one prompt length the other tools run: by default slmedge bench
            # also visits 32/512-token buckets and depths (longer, and a larger peak RSS).
            "--prompt-buckets",
            args.prompt_tokens,
            "--depths",
            args.prompt_tokens,
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
    )
    out = {k: r[k] for k in keep if k in r}
    if "tokens" in r:  # should slmedge bench ever report them
        out["tokens"] = r["tokens"]
    return out, r
