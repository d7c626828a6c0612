"""Check an artifact without running it in full: node placement, the manifest's verification,
.ort headers, memory budget, the card replayed on a target (no torch)."""
