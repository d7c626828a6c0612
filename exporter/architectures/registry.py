"""One small declarative spec per Hugging Face ``model_type``, in a registry.

A spec says what is special about a family when exporting it: which HF ``model_type``
values and GGUF ``general.architecture`` names it covers, the parity tolerance its
export must meet, the end-of-turn tokens its chat models stop on, and any
version-gated workaround (each in its own named place, with the error it fixes).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import ClassVar

from slmedge.runtimes.errors import UnsupportedArchitecture

_REGISTRY: dict[str, type[ArchitectureSpec]] = {}
_GGUF_TO_MODEL_TYPE: dict[str, str] = {}


class ArchitectureSpec:
    """Defaults shared by decoder-only families; subclasses override class attributes."""

    #: HF ``config.model_type`` values this spec exports (filled by the decorator).
    model_types: ClassVar[tuple[str, ...]] = ()
    #: Human name and example checkpoints, for help texts and errors.
    family: ClassVar[str] = ""
    examples: ClassVar[str] = ""
    #: GGUF ``general.architecture`` names that load as this family.
    gguf_architectures: ClassVar[tuple[str, ...]] = ()
    #: Oldest transformers release whose modeling code exports with the KV-cache wrapper.
    min_transformers: ClassVar[str] = "4.57"
    #: Largest |ONNX - PyTorch| logit difference accepted for an fp32 export is
    #: ``parity_atol + parity_rtol * max|logit|``: fp32 rounding grows with the logit scale
    #: (SmolLM2-135M, logits ~30: 9.5e-5 measured; tiny random models, logits ~3: ~1e-6).
    parity_atol: ClassVar[float] = 1e-4
    parity_rtol: ClassVar[float] = 1e-5
    #: End-of-turn tokens of the family's chat templates: generation stops on them too.
    end_of_turn_tokens: ClassVar[tuple[str, ...]] = ()
    #: ``--format tflite`` (litert-torch, exporter/tflite/convert.py's static-cache wrapper):
    #: ``None`` when the wrapper expresses the family, else why not (exit 4 with the reason).
    #: A new family is refused until its TFLite parity test passes.
    tflite_unsupported: ClassVar[str | None] = "not wired to the TFLite static-cache wrapper"
    #: TFLite: the config attribute listing each layer's attention type, for families that mix
    #: sliding-window and full attention (the wrapper builds one mask per type).
    tflite_layer_types_attr: ClassVar[str | None] = None
    #: onnxruntime-genai's ``model.type`` for the bundle's genai_config.json: set for the
    #: families whose fused graphs GenAI has loaded (onnxruntime-genai 0.18.0, a tiny fused
    #: graph each); ``None``: no genai_config.json (GenAI rejects unknown types with
    #: "Unsupported model_type in config.json").
    genai_model_type: ClassVar[str | None] = None
    #: GGUF tensors that transformers' GGUF name map does not name, by the HF parameter they
    #: fill (``gguf_source.GGUFWeights``): read from the file when it has them.
    gguf_unmapped_tensors: ClassVar[dict[str, str]] = {}

    @classmethod
    def kv_layout(cls, config) -> tuple[int, int, int]:
        """(layers, kv_heads, head_dim) of the KV cache."""
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return config.num_hidden_layers, kv_heads, head_dim

    @classmethod
    def export_patches(cls):
        """A context manager active during ``torch.export``; none by default."""
        return nullcontext()


def register_architecture(*model_types: str):
    """Class decorator: register a spec under one or more HF ``model_type`` values."""

    def wrap(spec: type[ArchitectureSpec]) -> type[ArchitectureSpec]:
        spec.model_types = tuple(model_types)
        for mt in model_types:
            if mt in _REGISTRY:
                raise ValueError(f"model_type '{mt}' registered twice")
            _REGISTRY[mt] = spec
        for arch in spec.gguf_architectures:
            _GGUF_TO_MODEL_TYPE[arch] = model_types[0]
        return spec

    return wrap


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def supported_gguf_architectures() -> list[str]:
    return sorted(_GGUF_TO_MODEL_TYPE)


def tflite_model_types() -> list[str]:
    """The ``model_type`` values ``--format tflite`` exports."""
    return sorted(mt for mt, spec in _REGISTRY.items() if spec.tflite_unsupported is None)


def get_spec(model_type: str) -> type[ArchitectureSpec]:
    """The spec of ``model_type``; an :class:`UnsupportedArchitecture` naming the supported ones."""
    try:
        return _REGISTRY[model_type]
    except KeyError:
        families = sorted({f"{s.family} ({', '.join(s.model_types)})" for s in _REGISTRY.values()})
        raise UnsupportedArchitecture(
            f"model_type '{model_type}' is not supported; supported architectures: "
            f"{'; '.join(families)}. Open an issue with the model id to ask for it"
        ) from None


def model_type_for_gguf(architecture: str) -> str:
    """The HF ``model_type`` a GGUF ``general.architecture`` loads as."""
    try:
        return _GGUF_TO_MODEL_TYPE[architecture]
    except KeyError:
        raise UnsupportedArchitecture(
            f"GGUF architecture '{architecture}' is not supported; supported: "
            f"{', '.join(supported_gguf_architectures())}"
        ) from None
