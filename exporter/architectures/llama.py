"""Llama: SmolLM2, Llama 3.2 (1B/3B), TinyLlama and other Llama-shaped checkpoints."""

from .registry import ArchitectureSpec, register_architecture


@register_architecture("llama")
class LlamaSpec(ArchitectureSpec):
    family = "Llama"
    examples = "SmolLM2-135M/360M/1.7B, Llama-3.2-1B/3B"
    gguf_architectures = ("llama",)
    # ChatML (SmolLM2) and Llama 3 chat templates end a turn with these.
    end_of_turn_tokens = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>")
    tflite_unsupported = None
    genai_model_type = "llama"
