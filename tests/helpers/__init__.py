"""What the tests share: tiny models of the real HF config classes, static artifacts, tiny GGUF
files, the benchmark scripts imported as modules."""
