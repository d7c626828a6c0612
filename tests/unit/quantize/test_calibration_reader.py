"""The calibration reader's samples are valid feeds for the graph they calibrate."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from slmedge.exporter.quantize.calibration import KVCacheCalibrationReader
from slmedge.exporter.quantize.recipe import CalibrationConfig


def test_fused_graph_samples_feed_logits_to_keep_and_run(tiny_artifact):
    """A fused graph takes `logits_to_keep`: every sample (prefill and decode) must feed it,
    or ORT's calibrators and GPTQ stop at the first sample with 'Required inputs missing'."""
    art = tiny_artifact("llama")
    model = art / "model.onnx"
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    assert "logits_to_keep" in {i.name for i in session.get_inputs()}
    config = CalibrationConfig(prefill_samples=2, decode_samples=3, prefill_tokens=16, max_past=12)
    reader = KVCacheCalibrationReader(model, list(range(5, 80)), config)
    samples = list(reader.samples())
    assert len(samples) == len(reader) == 5
    for feed in samples:
        assert int(feed["logits_to_keep"]) == 0  # every position: the lm_head sees them all
        logits = session.run(["logits"], feed)[0]
        n = feed["input_ids"].shape[1]
        assert logits.shape[:2] == (1, n) and np.isfinite(logits).all()
    decode = samples[2:]
    assert all(f["input_ids"].shape == (1, 1) for f in decode)
    past_len = [f["past_key_values.0.key"].shape[2] for f in decode]
    assert all(f["attention_mask"].shape[1] == p + 1 for f, p in zip(decode, past_len, strict=True))
