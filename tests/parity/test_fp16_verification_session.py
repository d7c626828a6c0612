"""An fp16 export whose fp32 session copy would cost more than ``FP16_COPY_MAX_EXTRA`` verifies
with its weights kept fp16 (issue 15: Qwen2.5-0.5B's export peak 3.2 -> 2.3 GB): the manifest
says so, the parity gate passes, and the card is the default session's within fp16 rounding."""

from __future__ import annotations

import json

import pytest

from slmedge.exporter.onnx import export


def test_fp16_export_verifies_with_fp16_weights_kept(tiny_artifact, tiny_dir, tmp_path,
                                                     monkeypatch):
    default = json.loads((tiny_artifact("llama", "fp16") / "manifest.json").read_text())
    assert "session" not in default["verification"]  # a tiny graph: ONNX Runtime's default
    monkeypatch.setattr(export, "FP16_COPY_MAX_EXTRA", 0)
    from slmedge.exporter.pipeline import ExportConfig, run_export

    kept = run_export(ExportConfig(model=str(tiny_dir("llama")), output=tmp_path / "out",
                                   dtype="fp16"))
    assert kept["verification"]["session"].startswith("fp16 weights kept fp16: their fp32 "
                                                      "copy in ONNX Runtime's session")
    parity = kept["verification"]["parity"]
    assert parity["passed"] and parity["argmax_agree"]
    want = default["verification"]["parity"]
    # the same PyTorch reference; the graph's logits within one fp16 step of the default's
    assert parity["logit_scale"] == want["logit_scale"]
    assert parity["max_abs_diff"] == pytest.approx(want["max_abs_diff"],
                                                   abs=want["logit_scale"] * 2**-9)
    assert kept["quality"]["eval"] == default["quality"]["eval"]
    assert kept["quality"]["perplexity"] == pytest.approx(default["quality"]["perplexity"],
                                                          rel=1e-3)
