"""Did the model survive the export: the comparison, the parity gate, the quality card and its
streamed PyTorch reference."""
