"""PyTorch / Hugging Face / GGUF -> ONNX with KV cache (needs the [export] extra)."""
