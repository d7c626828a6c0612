"""What the export records about its own run: seconds per phase (the benchmark reports them),
one ONNX Runtime session for the parity gate and the card, and external data chosen from the
memory ONNX Runtime's session will hold (fp16 weights as fp32 on x86)."""

from __future__ import annotations

import json

import pytest
import torch

from slmedge.exporter.onnx import streaming
from slmedge.exporter.quality.card import QualitySettings, artifact_card
from slmedge.exporter.sources.load import open_source

PHASES = ("load", "trace", "passes", "write", "support_files", "parity", "card")


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_manifest_times_every_phase(tiny_artifact, dtype):
    manifest = json.loads((tiny_artifact("llama", dtype) / "manifest.json").read_text())
    timings = manifest["timings_s"]
    assert set(PHASES) | {"export", "total"} <= set(timings)
    assert all(timings[p] >= 0 for p in PHASES)
    # export is trace + passes + write (each rounded to 0.01 s)
    assert timings["export"] == pytest.approx(
        timings["trace"] + timings["passes"] + timings["write"], abs=0.05)
    assert sum(timings[p] for p in PHASES) <= timings["total"] + 0.05


def test_card_from_the_gate_session_equals_a_fresh_session(tiny_artifact):
    """The export's card runs on the session the parity gate used (after its decode steps):
    the same figures as a session of its own."""
    artifact = tiny_artifact("llama", "fp16")
    manifest = json.loads((artifact / "manifest.json").read_text())
    card = manifest["quality"]
    settings = QualitySettings(eval_tokens=card["eval"]["tokens"])
    fresh = artifact_card(artifact / "model.onnx", artifact, settings).to_dict()
    assert card["perplexity"] == fresh["perplexity"]
    assert card["replay"]["tokens"] == fresh["replay"]["tokens"]
    assert card["replay"]["perplexity"] == fresh["replay"]["perplexity"]


def test_session_bytes_count_fp16_weights_as_fp32():
    layer = torch.nn.Linear(8, 4, bias=False)
    assert streaming.session_weights_bytes(layer) == 32 * 4
    assert streaming.session_weights_bytes(layer.half()) == 32 * 4


def test_fp16_graph_goes_external_from_its_fp32_size(tiny_dir, tmp_path, monkeypatch):
    streamed = open_source(str(tiny_dir("llama")), dtype="fp16")
    fp16_bytes = sum(p.numel() * 2 for p in streamed.model.parameters())
    # between the file's weights and what the session holds for them
    monkeypatch.setattr(streaming, "EXTERNAL_DATA_FROM", int(fp16_bytes * 1.5))
    info, _ = streaming.export_streamed(streamed, tmp_path / "model.onnx")
    assert info.external_data and (tmp_path / "model.onnx.data").exists()
    assert set(info.phases) == {"trace", "passes", "write"}


def test_a_session_above_the_budget_skips_gate_and_card_with_the_sizes(tiny_dir, tmp_path):
    from slmedge.exporter.pipeline import ExportConfig, run_export

    messages: list[str] = []
    manifest = run_export(ExportConfig(model=str(tiny_dir("llama")), output=tmp_path / "out",
                                       dtype="fp16", verify_session_max_mb=0.01),
                          progress=messages.append)
    parity, card = manifest["verification"]["parity"], manifest["quality"]
    assert parity["passed"] is None
    assert "fp16 as fp32" in parity["skipped"] and "verify_session_max_mb" in parity["skipped"]
    assert card == {"skipped": parity["skipped"]}
    assert any(m.startswith("parity gate and quality card skipped") for m in messages)
    assert (tmp_path / "out" / "model.onnx").exists()
