"""torch -> TFLite (prefill/decode signatures, static KV cache): the TFLite flow, its options
and its quantization recipes."""
