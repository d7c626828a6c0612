"""GPT-2 (learned absolute positions, LayerNorm, GELU)."""

from .registry import ArchitectureSpec, register_architecture


@register_architecture("gpt2")
class GPT2Spec(ArchitectureSpec):
    family = "GPT-2"
    examples = "gpt2, distilgpt2"
    gguf_architectures = ("gpt2",)
    end_of_turn_tokens = ("<|endoftext|>",)
    # transformers' GPT2TensorProcessor stores output.weight as lm_head.weight itself, outside
    # get_gguf_hf_weights_map's names
    gguf_unmapped_tensors = {"lm_head.weight": "output.weight"}
    tflite_unsupported = (
        "GPT-2's attention keeps the cache in its own Conv1D layout and learned absolute "
        "positions; it is not wired to the static-cache wrapper (ONNX export works)"
    )

    @classmethod
    def kv_layout(cls, config) -> tuple[int, int, int]:
        return config.n_layer, config.n_head, config.n_embd // config.n_head
