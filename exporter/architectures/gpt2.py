"""GPT-2 (learned absolute positions, LayerNorm, GELU)."""

from .registry import ArchitectureSpec, register_architecture


@register_architecture("gpt2")
class GPT2Spec(ArchitectureSpec):
    family = "GPT-2"
    examples = "gpt2, distilgpt2"
    gguf_architectures = ("gpt2",)
    end_of_turn_tokens = ("<|endoftext|>",)

    @classmethod
    def kv_layout(cls, config) -> tuple[int, int, int]:
        return config.n_layer, config.n_head, config.n_embd // config.n_head
