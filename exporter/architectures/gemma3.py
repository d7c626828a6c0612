"""Gemma 3 (text): alternating sliding-window and global attention layers.

The export keeps every layer's full KV cache and lets the attention mask apply the
sliding window (transformers builds that mask from ``config.sliding_window``), so all
layers share one cache shape and the graph stays free of data-dependent cropping.
"""

from .registry import ArchitectureSpec, register_architecture


@register_architecture("gemma3_text")
class Gemma3Spec(ArchitectureSpec):
    family = "Gemma 3"
    examples = "gemma-3-270m(-it), gemma-3-1b-it"
    gguf_architectures = ("gemma3",)
    end_of_turn_tokens = ("<end_of_turn>",)
    tflite_unsupported = None
    tflite_layer_types_attr = "layer_types"  # sliding_attention / full_attention per layer
    # Gemma's embedding scaling (sqrt(hidden)) and soft-capping make logits larger;
    # measured differences on tiny random models stay near 1e-6.
    parity_atol = 1e-4
