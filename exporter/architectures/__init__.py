"""Registered architectures. Importing this package registers every family."""

from . import gemma3, gpt2, llama, phi3, qwen2, qwen3  # noqa: F401  (registration side effect)
from .registry import (
    ArchitectureSpec,
    get_spec,
    model_type_for_gguf,
    register_architecture,
    supported_gguf_architectures,
    supported_model_types,
    tflite_model_types,
)

__all__ = [
    "ArchitectureSpec",
    "get_spec",
    "model_type_for_gguf",
    "register_architecture",
    "supported_gguf_architectures",
    "supported_model_types",
    "tflite_model_types",
]
