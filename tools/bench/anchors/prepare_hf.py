"""Write the embedded GGUF as a plain Hugging Face directory (fp32 safetensors + tokenizer).

Run by ``tools/bench/bench_anchors.py`` in the main venv (transformers 5.x), once; PyTorch eager
and Optimum both load this directory, so both run the very weights slmedge exports from
the GGUF. The directory is written next to its final place and renamed into it, so an
interrupted run leaves nothing that looks finished.

    python tools/bench/anchors/prepare_hf.py --model embedded:smollm2-135m-instruct --output DIR
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

#: Written into the output directory last; its presence means the directory is complete.
MARKER = "slmedge-anchors-source.json"


def fix_config_for_transformers_4(config: dict) -> list[str]:
    """Make a transformers-5 ``config.json`` mean the same thing to transformers 4.57.

    Returns what was changed. Optimum-onnx 0.1.0 pins transformers<4.58, which reads this
    file too. transformers 5 writes the RoPE settings as ``rope_parameters``
    (``{"rope_type": "default", "rope_theta": 100000.0}``) and drops the top-level
    ``rope_theta`` / ``rope_scaling`` keys; 4.57's LlamaConfig reads only those, and
    silently falls back to its default ``rope_theta = 10000`` -- a different model with no
    error. So the old keys are written back beside the new one. The weights' dtype is
    likewise written under 4.x's name ``torch_dtype`` as well as 5.x's ``dtype``.
    """
    changes = []
    rope = config.get("rope_parameters")
    if isinstance(rope, dict):
        if "rope_theta" in rope and config.get("rope_theta") != rope["rope_theta"]:
            config["rope_theta"] = rope["rope_theta"]
            changes.append(f"rope_theta={rope['rope_theta']} (from rope_parameters)")
        rope_type = rope.get("rope_type", "default")
        if rope_type != "default" and "rope_scaling" not in config:
            config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
            changes.append(f"rope_scaling (type {rope_type}, from rope_parameters)")
    if "dtype" in config and "torch_dtype" not in config:
        config["torch_dtype"] = config["dtype"]
        changes.append(f"torch_dtype={config['dtype']}")
    return changes


def fix_tokenizer_config_for_transformers_4(config: dict) -> list[str]:
    """Name a tokenizer class that transformers 4.57 knows; returns what was changed.

    transformers 5 saves ``"tokenizer_class": "TokenizersBackend"``, a class 4.57 does not
    have ("Tokenizer class TokenizersBackend does not exist or is not currently imported").
    ``PreTrainedTokenizerFast`` loads the same ``tokenizer.json`` in 4.57, and transformers 5
    maps that name back to ``TokenizersBackend``.
    """
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        return ["tokenizer_class=PreTrainedTokenizerFast (was TokenizersBackend)"]
    return []


def _rewrite_json(path: Path, fix) -> list[str]:
    data = json.loads(path.read_text())
    changes = fix(data)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return changes


def save_plain_copy(model, tokenizer, out: Path) -> None:
    """Save ``model`` as an unquantized fp32 checkpoint with its tokenizer.

    A model loaded from a GGUF keeps transformers' GGUF quantizer attached, and
    ``save_pretrained`` refuses it ("The model is quantized with gguf and is not
    serializable") although its weights are plain floats by then. So the weights are
    copied into a fresh model built from the same config, which saves normally.
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v.detach().to(torch.float32) for k, v in model.state_dict().items()}
    fresh.load_state_dict(state, strict=True, assign=True)
    fresh.tie_weights()
    fresh.generation_config = model.generation_config
    fresh.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--output", required=True, type=Path)
    args = parser.parse_args(argv)

    from slmedge.exporter.sources.load import load_source

    out: Path = args.output
    if (out / MARKER).exists():
        print(json.dumps({"output": str(out), "cached": True}))
        return 0
    loaded = load_source(args.model, dtype="fp32", progress=lambda m: print(m, file=sys.stderr))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        save_plain_copy(loaded.model, loaded.tokenizer, tmp)
        changes = _rewrite_json(tmp / "config.json", fix_config_for_transformers_4)
        changes += _rewrite_json(
            tmp / "tokenizer_config.json", fix_tokenizer_config_for_transformers_4
        )
        config = json.loads((tmp / "config.json").read_text())
        info = {
            "model": args.model,
            "source": loaded.source.to_dict(),
            "config_fixups_for_transformers_4": changes,
            "vocab_size": int(config["vocab_size"]),
        }
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
        if out.exists():  # an unfinished earlier attempt (no marker)
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(json.dumps({"output": str(out), "cached": False, **info}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
