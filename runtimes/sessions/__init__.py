"""Run an artifact's graphs: ONNX Runtime / LiteRT decoders, execution providers, shared
weights, the KV buffer (no torch)."""
