"""torch -> ONNX with KV cache: the ONNX flow, the static-shape (NPU) flow of a device profile,
the streamed export."""
