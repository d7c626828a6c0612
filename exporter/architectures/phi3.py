"""Phi-3 / Phi-3.5 / Phi-4-mini (fused qkv and gate_up projections)."""

from .registry import ArchitectureSpec, register_architecture


@register_architecture("phi3")
class Phi3Spec(ArchitectureSpec):
    family = "Phi-3"
    examples = "Phi-3-mini-4k-instruct, Phi-3.5-mini-instruct, Phi-4-mini-instruct"
    gguf_architectures = ("phi3",)
    end_of_turn_tokens = ("<|end|>", "<|endoftext|>")
    tflite_unsupported = None
    genai_model_type = "phi3"
