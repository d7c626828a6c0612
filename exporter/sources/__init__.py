"""Model sources: a Hugging Face directory or hub id, a GGUF file, the embedded default; loaded
in PyTorch."""
