"""The one export skeleton (exporter/skeleton.py) with a flow of its own: the steps run in
their order, a failing gate leaves nothing behind, and a profile's extra steps see the
complete manifest before it is written once (nothing reads a written manifest back)."""

from __future__ import annotations

import json

import pytest

from slmedge.exporter import skeleton
from slmedge.exporter.skeleton import ExportSteps, Extra, run_steps
from slmedge.exporter.sources.load import load_source
from slmedge.runtimes.artifact import MANIFEST_NAME
from slmedge.runtimes.errors import QualityGateFailed, UsageError


class Flow(ExportSteps):
    """Writes a placeholder graph; records which step ran, in what order."""

    card_phase = "quantize_and_card"

    def __init__(self, source: str, calls: list, *, fail: str | None = None):
        self.source, self.calls, self.fail = source, calls, fail

    def _step(self, name: str) -> None:
        self.calls.append(name)
        if name == self.fail:
            raise QualityGateFailed(f"{name} gate failed (test)")

    def check(self) -> None:
        self._step("check")

    def load(self, say):
        self._step("load")
        return load_source(self.source, dtype="fp32")

    def convert(self, stage, loaded, say):
        self._step("convert")
        (stage / "model.onnx").write_bytes(b"not a real graph")
        return {"export": 1.5}

    def parity(self, stage, loaded, say):
        self._step("parity")
        # the support files are written before the gate
        assert (stage / "tokenizer.json").is_file() and (stage / "config.json").is_file()
        return {"passed": True, "max_abs_diff": 0.0, "atol": 1e-4}

    def card(self, stage, loaded, parity, say):
        self._step("card")
        self.parity_seen = parity

    def fields(self, stage, loaded):
        self._step("fields")
        return {"format": "onnx", "model_file": "model.onnx", "recipe": {"dtype": "fp32"},
                "verification": {"own": "kept"},
                "timings_s": {"quantize_and_card_parts": {"quantize": 0.5}}}, {"model.onnx"}


class Profile(Extra):
    """Adds a file and checks the artifact with the manifest in hand."""

    def __init__(self):
        self.seen = None

    def files(self, stage, fields, say):
        (stage / "model.ort").write_bytes(b"ort")
        return {"ort_format": {"files": ["model.ort"]}}, {"model.ort"}

    def check(self, stage, manifest, final, say):
        self.seen = {"manifest_on_disk": (stage / MANIFEST_NAME).exists(),
                     "files": sorted(manifest["files"]), "final": final}
        return {"placement": {"path": str(final)}}


@pytest.fixture
def llama(tiny_dir) -> str:
    return str(tiny_dir("llama"))


def test_steps_run_in_order_and_the_manifest_is_written_once(llama, tmp_path):
    calls: list = []
    flow, profile = Flow(llama, calls), Profile()
    out = tmp_path / "artifact"
    manifest = run_steps(flow, out, False, None, command="slmedge export (test)",
                         extras=(profile,))
    assert calls == ["check", "load", "convert", "parity", "card", "fields"]
    assert flow.parity_seen == {"passed": True, "max_abs_diff": 0.0, "atol": 1e-4}
    # the extra step saw the complete manifest before it was written, the staging directory
    # holding the extra's file, and where the artifact goes
    seen = profile.seen
    assert seen["manifest_on_disk"] is False and seen["final"] == out
    assert {"model.onnx", "model.ort", "tokenizer.json", "config.json",
            "generation_config.json"} <= set(seen["files"])
    written = json.loads((out / MANIFEST_NAME).read_text())
    assert written == manifest
    assert manifest["command"] == "slmedge export (test)"
    assert manifest["placement"] == {"path": str(out)}
    assert manifest["files"]["model.ort"]["role"] == "model"
    assert manifest["files"]["tokenizer.json"]["role"] == "support"
    assert manifest["architecture"]["model_type"] == "llama"
    assert manifest["verification"]["parity"]["passed"] is True
    assert manifest["verification"]["own"] == "kept"
    assert manifest["verification"]["tokenizer"]["encode_matches_transformers"] is True
    timings = manifest["timings_s"]
    assert {"load", "export", "support_files", "parity", "quantize_and_card",
            "quantize_and_card_parts", "total"} == set(timings)
    assert timings["export"] == 1.5
    assert timings["quantize_and_card_parts"] == {"quantize": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]  # no staging left


def test_a_failing_gate_leaves_the_old_output_and_no_staging(llama, tmp_path):
    out = tmp_path / "artifact"
    out.mkdir()
    (out / "old.txt").write_text("kept")
    calls: list = []
    with pytest.raises(QualityGateFailed, match="parity gate failed"):
        run_steps(Flow(llama, calls, fail="parity"), out, True, None)
    assert calls == ["check", "load", "convert", "parity"]
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]


def test_output_is_checked_before_the_flow_and_the_flow_before_loading(llama, tmp_path,
                                                                        monkeypatch):
    out = tmp_path / "artifact"
    out.mkdir()
    (out / "x").write_text("x")
    calls: list = []
    with pytest.raises(UsageError, match="--overwrite"):
        run_steps(Flow(llama, calls), out, False, None)
    assert calls == []

    def refuse():
        calls.append("check")
        raise UsageError("missing --calibration (test)")

    flow = Flow(llama, calls)
    monkeypatch.setattr(flow, "check", refuse)
    monkeypatch.setattr(skeleton, "save_support_files", None)  # never reached
    with pytest.raises(UsageError, match="calibration"):
        run_steps(flow, tmp_path / "new", False, None)
    assert calls == ["check"]
