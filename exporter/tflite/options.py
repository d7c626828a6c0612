"""``slmedge export --format tflite``: its typed config (no torch, no LiteRT).

The flags that build it live with the CLI (``tools/cli/tflite.py``).

The TFLite path has its own ``--quant`` vocabulary, validated here and not by the ONNX
quantization recipe: the LiteRT kernels are different ones (ai-edge-quantizer recipes).
The ONNX names ``int8`` and ``int4`` are accepted as aliases of ``int8-dynamic`` and
``int4-block32``, so one device profile or script can name either format.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from slmedge.device_profiles.schema import TFLITE_SCHEMES, Precision, QuantScheme
from slmedge.runtimes.errors import UsageError

DEFAULT_MODEL = "embedded:smollm2-135m-instruct"  # same default as the ONNX path (sources/load.py)
DEFAULT_CONTEXT = 1024
DEFAULT_CHUNKS = (32, 128)


#: Names of the ONNX path (``--quant`` of exporter.quantize) that mean the same here.
QUANT_ALIASES = {
    "int8": QuantScheme.int8_dynamic,
    "int4": QuantScheme.int4_block32,
    "none": QuantScheme.fp32,
}
TFLITE_QUANT_CHOICES = [q.value for q in TFLITE_SCHEMES]


def parse_quant(value: str | QuantScheme | None) -> QuantScheme:
    """A ``--quant`` value of the TFLite path (one of :data:`TFLITE_SCHEMES`, or an ONNX alias);
    a :class:`UsageError` naming the choices."""
    if value is None:
        return QuantScheme.fp32
    name = value.value if isinstance(value, QuantScheme) else value
    if name in QUANT_ALIASES:
        return QUANT_ALIASES[name]
    if name in TFLITE_QUANT_CHOICES:
        return QuantScheme(name)
    raise UsageError(
        f"--format tflite does not offer --quant {name}; choose one of "
        f"{', '.join(TFLITE_QUANT_CHOICES)} (int8 = int8-dynamic, int4 = int4-block32)"
    )


class TfliteExportConfig(BaseModel):
    """Everything ``slmedge export --format tflite`` needs; ``--dry-run`` prints it."""

    model_config = ConfigDict(extra="forbid")

    format: str = Field("tflite", pattern="^tflite$", description="always tflite here")
    model: str = Field(
        DEFAULT_MODEL, description="HF directory, hub id, .gguf file or embedded:NAME"
    )
    output: Path = Field(..., description="artifact directory to write (replaced atomically)")
    quant: QuantScheme = Field(QuantScheme.fp32, description="ai-edge-quantizer recipe: "
                               + ", ".join(TFLITE_QUANT_CHOICES))
    context_length: int = Field(
        DEFAULT_CONTEXT,
        ge=8,
        le=131072,
        description="KV-cache rows (prompt + generated tokens) of the static cache",
    )
    prefill_chunks: list[int] = Field(
        default_factory=lambda: list(DEFAULT_CHUNKS),
        description="tokens per prefill signature; one signature per size",
    )
    profile: str | None = Field(None, description="device profile that set the sizes and recipe")
    from_artifact: Path | None = Field(
        None,
        description="an fp32 TFLite artifact of the same model and sizes: quantize its "
        "graph instead of converting again (the parity gate still compares with PyTorch)",
    )
    threads: int | None = Field(None, ge=1, description="LiteRT threads for parity and quality")
    overwrite: bool = Field(False, description="replace an existing non-empty output directory")
    parity_atol: float | None = Field(
        None, gt=0, description="fp32 logit tolerance of the parity gate (default: the family's)"
    )
    quant_steps: float = Field(
        4.0, gt=0, description="quantized parity tolerance, in quantization steps of the logits"
    )
    max_ppl_increase: float = Field(
        5.0, gt=0, description="quantized recipes: largest perplexity increase (%) over the fp32 "
        "graph; the gate when the quality card is on (the logit-step parity is then recorded)"
    )
    calib_samples: int = Field(16, ge=1, description="int8-static: calibration samples")
    quality: bool = Field(True, description="compute the quality card (perplexity, agreement)")
    eval_text: Path | None = Field(
        None, description="evaluation text; default eval_mansfield_park.txt"
    )
    eval_tokens: int = Field(4096, ge=2, description="score the first N tokens of the text")
    greedy_tokens: int = Field(64, ge=1, description="greedy tokens per prompt for agreement")

    @field_validator("quant", mode="before")
    @classmethod
    def _alias(cls, value):
        return parse_quant(value)

    @model_validator(mode="after")
    def _sizes(self):
        chunks = sorted(set(self.prefill_chunks))
        if not chunks:
            raise ValueError("prefill_chunks needs at least one size")
        if chunks[0] < 2 or chunks[-1] > self.context_length:
            raise ValueError(
                f"prefill_chunks {chunks} must lie in [2, context_length="
                f"{self.context_length}] (decode covers 1 token)"
            )
        self.prefill_chunks = chunks
        return self


def profile_fields(name: str) -> dict:
    """Sizes, recipe and threads a device profile gives the TFLite export (config fields)."""
    from slmedge.device_profiles.loader import load_profile

    profile = load_profile(name)
    fields: dict = {"profile": profile.name}
    formats = {f.value for f in profile.artifact.formats}
    if "tflite" not in formats:
        raise UsageError(
            f"--profile {name} writes {', '.join(sorted(formats))}, not tflite; pick a profile "
            "whose runtime.engine is litert, or drop --format tflite"
        )
    shapes = profile.shapes
    if shapes.context_length:
        fields["context_length"] = shapes.context_length
    if shapes.prefill_chunk:
        fields["prefill_chunks"] = [shapes.prefill_chunk]
    recipe = profile.recipe
    if recipe.quantization is not QuantScheme.none:
        if recipe.quantization is QuantScheme.a16w8:
            raise UsageError(f"--profile {name}: a16w8 has no TFLite recipe here; use int8-static")
        fields["quant"] = parse_quant(recipe.quantization.value).value
    elif recipe.precision is Precision.fp16:
        fields["quant"] = QuantScheme.fp16.value
    if profile.runtime.threads:
        fields["threads"] = profile.runtime.threads
    return fields


def require_tflite_extra() -> None:
    """A clear :class:`MissingDependency` (exit 2) before any work when [tflite] is absent."""
    import importlib.util

    from slmedge.runtimes.errors import MissingDependency

    missing = [
        name
        for name, module in (
            ("litert-torch", "litert_torch"),
            ("ai-edge-litert", "ai_edge_litert"),
            ("ai-edge-quantizer", "ai_edge_quantizer"),
            ("torch", "torch"),
            ("tensorflow-cpu", "tensorflow"),
        )
        if importlib.util.find_spec(module) is None
    ]
    if missing:
        raise MissingDependency(
            f"--format tflite needs the [tflite] extra ({', '.join(missing)} not installed); it "
            "clashes with the main venv's pins (typing-extensions), so it has its own venv: "
            "tools/setup_tflite.sh, then .venv-tflite/bin/slmedge export --format tflite ..."
        )
