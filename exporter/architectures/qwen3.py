"""Qwen3 (dense): Llama-shaped with per-head RMSNorm on queries and keys."""

from .qwen2 import Qwen2Spec
from .registry import register_architecture


@register_architecture("qwen3")
class Qwen3Spec(Qwen2Spec):
    family = "Qwen3"
    examples = "Qwen3-0.6B/1.7B/4B"
    gguf_architectures = ("qwen3",)
    genai_model_type = "qwen3"
