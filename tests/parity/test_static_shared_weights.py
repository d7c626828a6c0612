"""StaticDecoder(share_weights=True): prefill and decode compute from one mapping of
model.onnx.data (runtimes.sessions.shared_weights), with the logits of unshared sessions."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers.static_fixtures import static_artifact_path

import slmedge.runtimes.sessions.onnx_decoder as onnx_decoder
from slmedge.runtimes.artifact import open_artifact
from slmedge.runtimes.sessions.shared_weights import SharedWeights
from slmedge.runtimes.sessions.static_decoder import StaticDecoder, _share, open_decoder

IDS = np.random.default_rng(5).integers(0, 128, 15).tolist()


@pytest.fixture(scope="module")
def static_llama(tmp_path_factory, tiny_dir):
    return static_artifact_path(tmp_path_factory, tiny_dir, "llama")


def _run(decoder) -> np.ndarray:
    """Logits of a 11-token prompt (two prefill chunks of 8) and 4 decode steps."""
    decoder.reset()
    out = [decoder.step(IDS[:11], all_logits=True)]
    out += [decoder.step([t], all_logits=True) for t in IDS[11:]]
    return np.concatenate(out)


def _external(path) -> dict[str, tuple[int, int]]:
    """onnx's reading: initializer -> (offset, length) in model.onnx.data."""
    model = onnx.load(str(path), load_external_data=False)
    out = {}
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            e = {x.key: x.value for x in t.external_data}
            assert e["location"] == "model.onnx.data"
            out[t.name] = (int(e.get("offset", 0)), int(e["length"]))
    return out


def test_both_sessions_get_every_tensor_of_the_weights_file(static_llama):
    decoder = open_decoder(open_artifact(static_llama), share_weights=True)
    report = decoder.weight_sharing
    prefill = _external(static_llama / "prefill.onnx")
    decode = _external(static_llama / "decode.onnx")
    distinct = set(prefill.values()) | set(decode.values())
    assert report["enabled"] and report["files"] == ["model.onnx.data"]
    assert report["per_graph"] == {"prefill": len(prefill), "decode": len(decode)} and prefill
    assert report["tensors"] == len(distinct) > 0 and report["skipped"] == 0
    assert report["bytes"] == sum(n for _, n in distinct)
    assert report["bytes"] <= (static_llama / "model.onnx.data").stat().st_size
    shared = decoder.shared_weights
    for name in set(prefill) & set(decode):  # one array (one OrtValue) for both sessions
        assert shared.array(static_llama / "prefill.onnx", name) is \
            shared.array(static_llama / "decode.onnx", name)
    for session in decoder.sessions.values():  # the values outlive the sessions
        assert session._slmedge_shared_weights is shared


def test_shared_logits_equal_unshared_ones_exactly(static_llama, monkeypatch):
    shared = _run(open_decoder(open_artifact(static_llama), share_weights=True))
    default = _run(open_decoder(open_artifact(static_llama)))
    # Sharing turns pre-packing off: the GEMM then blocks differently, which may move the
    # last bits (SmolLM2 fp32: up to 3e-5 on logits of magnitude ~20); the tiny model is close.
    np.testing.assert_allclose(shared, default, atol=1e-5, rtol=0)

    # Same kernels, weights loaded by each session itself: bit for bit what sharing gives.
    make_session = onnx_decoder.make_session

    def unshared(path, **kwargs):
        opts = ort.SessionOptions()
        opts.add_session_config_entry("session.disable_prepacking", "1")
        return make_session(path, session_options=opts, **kwargs)

    monkeypatch.setattr(onnx_decoder, "make_session", unshared)
    alone = StaticDecoder(static_llama, open_artifact(static_llama).manifest["static"])
    assert not alone.weight_sharing["enabled"]
    np.testing.assert_array_equal(shared, _run(alone))


def test_sessions_compute_from_the_shared_mapping(static_llama, monkeypatch):
    """Change a weight in the mapping only (copy-on-write: the file and any mapping ONNX
    Runtime made itself keep the old bytes): both graphs' logits follow, and come back when
    the weight is restored. Were the initializers ignored, nothing would move."""
    monkeypatch.setattr(SharedWeights, "_MAP_MODE", "c")
    decoder = open_decoder(open_artifact(static_llama), share_weights=True)
    before = _run(decoder)
    decode = _external(static_llama / "decode.onnx")
    name = max(decode, key=lambda n: (decode[n][1], n))  # a large weight (MatMul or table)
    weight = decoder.shared_weights.array(static_llama / "decode.onnx", name)
    original = weight.copy()
    weight *= 0.5
    offset, length = decode[name]
    with open(static_llama / "model.onnx.data", "rb") as f:  # the file keeps the old bytes
        f.seek(offset)
        assert f.read(length) == original.tobytes() != weight.tobytes()
    changed = _run(decoder)
    prompt = 11
    assert np.abs(changed[:prompt] - before[:prompt]).max() > 1e-3  # prefill graph
    assert np.abs(changed[prompt:] - before[prompt:]).max() > 1e-3  # decode graph
    weight[...] = original
    np.testing.assert_array_equal(_run(decoder), before)


def test_accelerator_sessions_and_ort_graphs_are_left_as_they_were(static_llama):
    files = {"prefill": static_llama / "prefill.onnx", "decode": static_llama / "decode.onnx"}
    shared, report = _share(files, [("QNNExecutionProvider", {"backend_type": "htp"}),
                                    ("CPUExecutionProvider", {})])
    assert shared is None and not report["enabled"] and "QNNExecutionProvider" in report["reason"]
    ort_files = {kind: p.with_suffix(".ort") for kind, p in files.items()}  # --format ort
    shared, report = _share(ort_files, None)
    assert shared is None and "ORT-format" in report["reason"]
    shared, report = _share(files, [("CPUExecutionProvider", {})])
    assert shared is not None and report["enabled"]
    decoder = open_decoder(open_artifact(static_llama))  # the default: nothing shared
    assert decoder.shared_weights is None and not decoder.weight_sharing["enabled"]
    assert not hasattr(decoder.sessions["decode"], "_slmedge_shared_weights")
