"""Steps of bench_anchors.py (a repository script, not installed with slmedge)."""
