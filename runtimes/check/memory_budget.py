"""Does an artifact fit a device profile's memory budget? Weights + KV cache + runtime.

A profile's ``device.ram_budget_mb`` is what the model may use on the target. The estimate
is read from the artifact alone (no session, no device): the model files' size on disk
(graph + external weights: what ONNX Runtime maps or reads), the KV cache at the profile's
context (``shapes.context_length`` of a static profile; for a dynamic profile the caller's
``context`` or :data:`DEFAULT_DYNAMIC_CONTEXT` tokens, capped by the model's own maximum), and
:data:`RUNTIME_ALLOWANCE_MB` for the runtime itself (the issue's bound on RSS after load is
file size + 150 MB). ``slmedge check`` / ``bench`` / ``bundle`` warn when the sum is above
the budget; with ``--strict`` they refuse (exit 4).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from slmedge.runtimes.artifact import Artifact

#: what ONNX Runtime, the tokenizer and the Python runner take beside the weights (MB)
RUNTIME_ALLOWANCE_MB = 150
#: tokens of KV cache assumed for a dynamic-shape profile when none is given
DEFAULT_DYNAMIC_CONTEXT = 4096
_KV_BYTES = {"fp16": 2, "fp32": 4}


@dataclass
class MemoryEstimate:
    """Weights + KV cache + runtime allowance against a profile's RAM budget (MB = 10^6 B)."""

    profile: str
    budget_mb: int
    weights_mb: float
    kv_cache_mb: float
    runtime_mb: float
    context: int
    context_from: str
    kv_bytes_per_token: int

    @property
    def total_mb(self) -> float:
        return self.weights_mb + self.kv_cache_mb + self.runtime_mb

    @property
    def fits(self) -> bool:
        return self.total_mb <= self.budget_mb

    def message(self) -> str:
        """One line: the sum, its parts, the budget and, when over it, what to do."""
        line = (f"memory on {self.profile}: weights {self.weights_mb:.0f} MB + KV cache "
                f"{self.kv_cache_mb:.0f} MB ({self.context} tokens, {self.context_from}) + "
                f"runtime {self.runtime_mb:.0f} MB = {self.total_mb:.0f} MB of a "
                f"{self.budget_mb} MB budget")
        if self.fits:
            return line
        return (line + f": over by {self.total_mb - self.budget_mb:.0f} MB. Quantize the "
                "weights (--quant int4), use a shorter context, or a profile with a larger "
                "device.ram_budget_mb")

    def to_dict(self) -> dict:
        doc = asdict(self)
        for key in ("weights_mb", "kv_cache_mb"):
            doc[key] = round(doc[key], 1)
        return {**doc, "total_mb": round(self.total_mb, 1), "fits": self.fits}


def _model_config(artifact: Artifact) -> dict:
    path = artifact.root / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _max_positions(artifact: Artifact) -> tuple[int | None, str]:
    """The longest sequence the artifact runs and what says so: a fused graph capped at
    export (``--max-context``: the manifest's ``fusion.model_max_sequence_length`` is set),
    else the model's own maximum."""
    fusion = getattr(artifact.info, "fusion", None) or {}
    if fusion.get("model_max_sequence_length") and fusion.get("max_sequence_length"):
        return int(fusion["max_sequence_length"]), "export's --max-context"
    config = _model_config(artifact)
    value = config.get("max_position_embeddings") or config.get("n_positions")
    return (int(value) if value else None), "model maximum"


def kv_bytes_per_token(artifact: Artifact) -> int:
    """Key + value bytes one token adds to the cache, from the manifest's architecture
    (0 for a bare model file, whose architecture is unknown)."""
    info = artifact.info
    arch = info.architecture if info else None
    if arch is None:
        return 0
    dtype = (info.recipe.dtype if info.recipe else None) or "fp32"
    return 2 * arch.num_layers * arch.kv_heads * arch.head_dim * _KV_BYTES.get(dtype, 4)


def estimate_memory(artifact: Artifact, profile, context: int | None = None) -> MemoryEstimate:
    """What ``artifact`` needs on ``profile``'s device, at ``context`` tokens of KV cache.

    ``context`` None: the profile's static context length, else
    :data:`DEFAULT_DYNAMIC_CONTEXT` capped by the model's ``max_position_embeddings``."""
    info = artifact.info
    static = info.static.context_length if info and info.static else None
    if context is not None:
        tokens, why = int(context), "--context"
    elif profile.shapes.context_length:
        tokens, why = int(profile.shapes.context_length), "the profile's context_length"
    elif static:
        tokens, why = int(static), "the static export's context_length"
    else:
        limit, what = _max_positions(artifact)
        tokens = min(DEFAULT_DYNAMIC_CONTEXT, limit) if limit else DEFAULT_DYNAMIC_CONTEXT
        why = (f"dynamic shapes: default {DEFAULT_DYNAMIC_CONTEXT}"
               + (f", {what} {limit}" if limit and limit < DEFAULT_DYNAMIC_CONTEXT else ""))
    per_token = kv_bytes_per_token(artifact)
    return MemoryEstimate(
        profile=profile.name,
        budget_mb=profile.device.ram_budget_mb,
        weights_mb=artifact.file_size_mb(),
        kv_cache_mb=per_token * tokens / 1e6,
        runtime_mb=RUNTIME_ALLOWANCE_MB,
        context=tokens,
        context_from=why,
        kv_bytes_per_token=per_token,
    )


def check_memory(path: str | Path, profile, context: int | None = None) -> MemoryEstimate:
    """:func:`estimate_memory` for the artifact directory at ``path``."""
    from slmedge.runtimes.artifact import open_artifact

    return estimate_memory(open_artifact(path), profile, context)
