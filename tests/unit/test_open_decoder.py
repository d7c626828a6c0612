"""One place picks an artifact's decoder (runtimes.sessions.static_decoder.open_decoder): LiteRT for a
TFLite artifact, ONNX Runtime's static-shape or KV-cache decoder otherwise. The CLI, the
bench, verify and the device's quality card all open artifacts through it (issue 13: three
copies of the choice before)."""

from __future__ import annotations

from pathlib import Path

import pytest

from slmedge.runtimes.sessions import litert_decoder, onnx_decoder, static_decoder
from slmedge.runtimes.artifact import Artifact
from slmedge.runtimes.sessions.static_decoder import open_decoder


@pytest.fixture
def opened(monkeypatch):
    """The decoder classes replaced by recorders: which one was opened, with what."""
    calls: list[tuple] = []

    def recorder(kind):
        def make(*args, **kwargs):
            calls.append((kind, args, kwargs))
            return kind
        return make

    monkeypatch.setattr(litert_decoder, "open_litert_decoder", recorder("litert"))
    monkeypatch.setattr(onnx_decoder, "OnnxDecoder", recorder("onnx"))
    monkeypatch.setattr(static_decoder, "StaticDecoder", recorder("static"))
    return calls


def _artifact(manifest: dict, name: str) -> Artifact:
    return Artifact(Path("/a"), manifest, Path("/a") / name)


def test_a_tflite_artifact_opens_litert_with_its_threads_only(opened):
    artifact = _artifact({"format": "tflite"}, "model.tflite")
    assert open_decoder(artifact, threads=3, providers=["QNNExecutionProvider"],
                        strict=True) == "litert"
    assert opened == [("litert", (artifact,), {"threads": 3})]  # no providers for LiteRT


def test_onnx_artifacts_open_onnx_runtime_with_the_session_settings(opened):
    assert open_decoder(_artifact({}, "model.onnx"), threads=2, strict=True) == "onnx"
    assert opened[-1] == ("onnx", (Path("/a/model.onnx"),),
                          {"threads": 2, "providers": None, "strict": True,
                           "allow_cpu_fallback": True})
    static = {"context_length": 32, "prefill_chunk": 8}
    assert open_decoder(_artifact({"format": "onnx", "static": static}, "decode.onnx"),
                        share_weights=True) == "static"
    assert opened[-1] == ("static", (Path("/a"), static),
                          {"share_weights": True, "threads": None, "providers": None,
                           "strict": False, "allow_cpu_fallback": True})
