"""Run exported artifacts: ONNX Runtime sessions, the generation loop, perplexity, the benchmark
runner. Imports neither torch nor transformers: it must run on a Raspberry Pi or in Termux with
onnxruntime, numpy and tokenizers only."""
