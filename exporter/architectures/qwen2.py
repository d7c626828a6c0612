"""Qwen2 / Qwen2.5 (dense)."""

from .llama import LlamaSpec
from .registry import register_architecture


@register_architecture("qwen2")
class Qwen2Spec(LlamaSpec):
    family = "Qwen2"
    examples = "Qwen2.5-0.5B/1.5B/3B-Instruct"
    gguf_architectures = ("qwen2",)
    end_of_turn_tokens = ("<|im_end|>", "<|endoftext|>")
    genai_model_type = "qwen2"
