"""``slmedge export --profile`` for QNN HTP (a16w8 static graphs): --device-card, the fused norms
and the placement section of the manifest, on a tiny Llama."""

from __future__ import annotations

import importlib.util
import json
import shlex

import pytest

from slmedge.runtimes.errors import EXIT_OK, EXIT_USAGE
from slmedge.tools.cli.app import main

HAS_QNN = importlib.util.find_spec("onnxruntime_qnn") is not None
#: android-qnn-htp (a16w8, fused norms) with a window small enough for a tiny model
PROFILE = """\
name: test-qnn
extends: android-qnn-htp
shapes:
  context_length: 32
  prefill_chunk: 8
"""


def _export(tmp_path, tiny_dir, capsys, *flags) -> tuple[int, dict, str]:
    profile = tmp_path / "test-qnn.yaml"
    profile.write_text(PROFILE)
    out = tmp_path / "artifact"
    code = main(["export", "--model", str(tiny_dir("llama")), "--output", str(out), "--profile",
                 str(profile), "--json", *flags])
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if code == EXIT_OK else {}, captured.err


def test_device_card_off_records_the_choice_and_the_final_placement_path(tmp_path, tiny_dir,
                                                                         capsys):
    code, manifest, err = _export(tmp_path, tiny_dir, capsys, "--device-card", "off")
    assert code == EXIT_OK, err
    out = tmp_path / "artifact"
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["recipe"]["device_card"] == "off" and on_disk["recipe"]["fuse_norms"] is True
    # the user's command as given (the ONNX flow records it so), not this process's argv
    assert on_disk["command"] == shlex.join(
        ["slmedge", "export", "--model", str(tiny_dir("llama")), "--output", str(out),
         "--profile", str(tmp_path / "test-qnn.yaml"), "--json", "--device-card", "off"])
    assert on_disk["recipe"]["opset"] == 21 and on_disk["recipe"]["quant"].startswith("a16w8")
    quality = on_disk["quantization"]["quality"]
    assert quality["device_card"]["setting"] == "off" and not quality["device_card"]["ran"]
    assert quality["judged_on"] == "cpu" and "qnn_htp_emulator" not in quality
    assert on_disk["verification"]["device_card"] == quality["device_card"]
    # the fused norms stay float in both QDQ graphs (profile float_ops), and the manifest says so
    for table in on_disk["quantization"]["tables"].values():
        assert table["SimplifiedLayerNormalization"] == {**table["SimplifiedLayerNormalization"],
                                                         "quantized": 0, "float": 5}
    assert on_disk["static"]["norms"]["count"] == {"prefill": 5, "decode": 5}
    # issue 4: the placement section names the artifact, not the staging directory
    assert on_disk["placement"]["artifact"] == str(out)
    assert ".partial-" not in json.dumps(on_disk)
    if HAS_QNN:  # the placement check itself still ran on the emulator (CPU fallback allowed
        # there, the Q/DQ of the KV inputs and outputs land on CPU; with it off they go to the
        # HTP: test_static_norms)
        assert all(g["coverage"] > 0.95 for g in on_disk["placement"]["graphs"])


@pytest.mark.qnn
@pytest.mark.skipif(not HAS_QNN, reason="onnxruntime-qnn is not installed here "
                    "(wheels: Linux x86_64 / Windows, Python >= 3.11)")
def test_device_card_short_runs_one_chunk_on_the_htp_emulator(tmp_path, tiny_dir, capsys):
    code, manifest, err = _export(tmp_path, tiny_dir, capsys, "--device-card", "short")
    assert code == EXIT_OK, err
    quality = manifest["quantization"]["quality"]
    assert quality["device_card"] == {"setting": "short", "ran": True}
    assert quality["judged_on"] == "qnn_htp_emulator"
    card = quality["qnn_htp_emulator"]
    assert card["eval"]["tokens"] == 8
    assert card["greedy"]["prompts"] == 1 and card["greedy"]["new_tokens"] == 4
    assert card["cosine_mean"] > 0.95, card


def test_qdq_writers_give_the_same_graphs_and_placement(tmp_path, tiny_dir, capsys):
    """The QDQ graphs are written one calibration segment at a time by default; ORT's
    whole-graph writer stays selectable (--calib-writer whole) and gives the same graphs. The
    fused norms (SimplifiedLayerNormalization, unknown to ONNX's shape inference) once left
    every activation after a norm unquantized in the segments' graphs: 212 nodes instead of
    362, and 22 weight DequantizeLinear nodes fell back to CPU on the HTP emulator."""
    import onnx

    from slmedge.exporter.quantize.qdq_writer import same_graph

    graphs, placed = {}, {}
    for writer in ("segments", "whole"):
        work = tmp_path / writer
        work.mkdir()
        flags = ["--quant", "a16w8", "--calib-writer", "whole"] if writer == "whole" else []
        code, _, err = _export(work, tiny_dir, capsys, "--device-card", "off", *flags)
        assert code == EXIT_OK, err
        manifest = json.loads((work / "artifact" / "manifest.json").read_text())
        assert manifest["quantization"]["writer"] == writer
        graphs[writer] = {g: onnx.load(str(work / "artifact" / g))
                          for g in ("prefill.onnx", "decode.onnx")}
        placed[writer] = {g["file"]: (g["coverage"], g["nodes_by_provider"])
                          for g in manifest["placement"]["graphs"]}
    for name, model in graphs["segments"].items():
        assert not same_graph(graphs["whole"][name], model), name
        assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) > 40
    assert placed["segments"] == placed["whole"]
    if HAS_QNN:
        assert all(c > 0.95 for c, _ in placed["segments"].values()), placed


def test_device_card_without_a_profile_is_a_usage_error(tmp_path, tiny_dir, capsys):
    code = main(["export", "--model", str(tiny_dir("llama")), "--output", str(tmp_path / "o"),
                 "--device-card", "off"])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert "device_card off" in err and "--profile" in err
    assert not (tmp_path / "o").exists()


def test_device_card_is_in_export_help(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--device-card {full,short,off}" in text and "the CPU card gates" in text
