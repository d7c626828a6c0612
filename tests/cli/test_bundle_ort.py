"""Bundles in ORT format (`slmedge bundle --format ort`) and what `slmedge verify` reads from
their `.ort` files (format version, minimum runtime); split from test_bundle.py."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
from test_bundle import _weight_copies, manifest_of, one_line_error, run

from slmedge.tools.cli.app import main


@pytest.fixture(scope="module")
def ort_bundle(tmp_path_factory, tiny_dir) -> tuple[Path, str]:
    """The tiny static export bundled with --format ort, and the bundle command's stdout."""
    import contextlib
    import io

    from helpers.static_fixtures import static_artifact_path

    artifact = static_artifact_path(tmp_path_factory, tiny_dir)
    out = tmp_path_factory.mktemp("ort-bundle") / "ort"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["bundle", str(artifact), "--profile", str(artifact.parent / "test-npu.yaml"),
                     "-o", str(out), "--format", "ort"])
    assert code == 0
    return out, stdout.getvalue()


def test_static_bundle_in_ort_format_ships_only_the_ort_files(capsys, tmp_path_factory,
                                                             tiny_dir, ort_bundle):
    """--format ort: .ort graphs + the operators config, no .onnx / external data; ORT format
    inlines the weights, so the manifest says they are there twice, and they are."""
    import onnxruntime as ort
    from helpers.static_fixtures import static_artifact_path

    artifact = static_artifact_path(tmp_path_factory, tiny_dir)
    out, stdout = ort_bundle
    assert "ort, weights x2" in stdout
    manifest = manifest_of(out)
    static = manifest["static"]
    assert (static["prefill_file"], static["decode_file"]) == ("prefill.ort", "decode.ort")
    assert static["weights_file"] is None and manifest["model_file"] == "decode.ort"
    assert {f for f in manifest["files"] if manifest["files"][f]["role"] == "model"} == \
        {"prefill.ort", "decode.ort"}
    assert "required_operators.config" in manifest["files"]
    assert manifest["model_format"]["weights_copies"] == 2 == \
        max(_weight_copies(artifact, out))
    assert manifest["model_format"]["converted_from"] == {"prefill.ort": "prefill.onnx",
                                                          "decode.ort": "decode.onnx"}
    for kind in ("prefill", "decode"):  # the io shown in snippets is the .ort graph's own
        session = ort.InferenceSession(str(out / static[f"{kind}_file"]),
                                       providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == \
            [i["name"] for i in static["io"][kind]["inputs"]]
    # ORT format v6 is read from ONNX Runtime 1.16 on: the minimum is at least that, and
    # graphs that need less (none here) would be raised to it.
    from slmedge.exporter.bundle.build import _runtime_section
    from slmedge.runtimes.check.ort_format import ORT_FORMAT_MINIMUM, read_ort_header

    first = ORT_FORMAT_MINIMUM[read_ort_header(out / "decode.ort")["format_version"]]
    minimum = manifest["onnxruntime"]["minimum"]
    assert tuple(int(x) for x in minimum.split(".")) >= first
    from slmedge.runtimes.manifest_schema import load_manifest

    raised = _runtime_section({}, load_manifest(out), {"decode.ort": out / "decode.ort"})[0]
    assert raised["minimum"] == f"{first[0]}.{first[1]}"
    assert raised["because"] == [f"decode.ort: ORT format v6, read from ONNX Runtime "
                                 f"{first[0]}.{first[1]} on"]
    # per .ort file, the manifest records what its header says and who converted it
    for name in ("prefill.ort", "decode.ort"):
        recorded = manifest["ort_format"]["graphs"][name]
        assert {k: recorded[k] for k in ("format_version", "ir_version", "opset")} == \
            {k: read_ort_header(out / name)[k] for k in ("format_version", "ir_version", "opset")}
        assert recorded["minimum_onnxruntime"] == f"{first[0]}.{first[1]}"
        assert recorded["converted_with"] == manifest_of(artifact)["versions"]["onnxruntime"]
    kotlin = (out / "snippets/android/SlmEdgeModel.kt").read_text()
    assert dict(re.findall(r'const val (\w+) = "([^"]*)"', kotlin)) == {
        "PREFILL_FILE": "prefill.ort", "DECODE_FILE": "decode.ort"}
    assert "read their weights from" not in kotlin
    code, stdout, err = run(capsys, "verify", out, "--json")
    assert code == 0, err
    assert json.loads(stdout)["parity"]["tokens_match"]


def test_ort_header_of_a_real_ort_file_matches_onnxruntime(tmp_path):
    """slmedge's reader of .ort headers agrees with ONNX Runtime's own FlatBuffers bindings on a
    file the installed onnxruntime wrote, and the installed runtime reads the version it writes.
    (``InferenceSession.ort_version`` is the ORT *format* version, not onnxruntime's.)"""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs import InferenceSession

    from slmedge.runtimes.check.ort_format import (
        ORT_FORMAT_VERSIONS,
        OrtFormatError,
        parse_ort_header,
        read_ort_header,
    )

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.ones((4, 4), np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="slmedge-test", producer_version="0.1")
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "tiny.onnx"))
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "tiny.ort")
    options.intra_op_num_threads = 1
    ort.InferenceSession(str(tmp_path / "tiny.onnx"), options, providers=["CPUExecutionProvider"])

    header = read_ort_header(tmp_path / "tiny.ort")
    data = (tmp_path / "tiny.ort").read_bytes()
    truth = InferenceSession.InferenceSession.GetRootAs(data, 0)
    assert header["format_version"] == int(truth.OrtVersion())
    assert header["ir_version"] == truth.Model().IrVersion() == 8
    assert header["opset"] == 17 and header["producer"] == "slmedge-test 0.1"
    first, last = ORT_FORMAT_VERSIONS[header["format_version"]]
    installed = tuple(int(x) for x in ort.__version__.split(".")[:2])
    assert first <= installed and last is None
    with pytest.raises(OrtFormatError, match="past the end"):
        parse_ort_header(data[:len(data) // 2], "half.ort")


def test_verify_reports_the_ort_format_and_passes_the_current_runtime(capsys, ort_bundle):
    import onnxruntime as ort

    from slmedge.runtimes.check.ort_format import ORT_FORMAT_MINIMUM, read_ort_header

    out, _ = ort_bundle
    current = ".".join(ort.__version__.split(".")[:2])
    code, stdout, err = run(capsys, "verify", out, "--runtime-version", current, "--no-parity",
                            "--json")
    assert code == 0, err
    report = json.loads(stdout)
    version = read_ort_header(out / "decode.ort")["format_version"]
    first = ORT_FORMAT_MINIMUM[version]
    assert set(report["ort_files"]) == {"prefill.ort", "decode.ort"}
    assert report["ort_files"]["decode.ort"]["format_version"] == version
    assert report["ort_files"]["decode.ort"]["minimum_onnxruntime"] == f"{first[0]}.{first[1]}"
    assert report["ort_files"]["decode.ort"]["converted_with"] == ort.__version__
    assert report["minimum_onnxruntime"] == manifest_of(out)["onnxruntime"]["minimum"]
    code, stdout, err = run(capsys, "verify", out, "--no-parity")
    assert code == 0, err
    assert f"decode.ort, prefill.ort: ORT format v{version}, read from ONNX Runtime " \
           f"{first[0]}.{first[1]} on, converted by onnxruntime {ort.__version__}" in stdout


def test_verify_refuses_a_runtime_older_than_the_ort_format(capsys, ort_bundle, tmp_path):
    """The release just before the one that introduced the files' ORT format cannot load them;
    with the graphs' ONNX facts taken out of the manifest (the tiny export's IR version 10
    alone needs 1.18), the .ort files' format alone refuses it and sets the minimum."""
    from slmedge.runtimes.check.ort_format import ORT_FORMAT_MINIMUM, read_ort_header

    out, _ = ort_bundle
    version = read_ort_header(out / "decode.ort")["format_version"]
    first = ORT_FORMAT_MINIMUM[version]
    older = f"{first[0]}.{first[1] - 1}"
    code, _, err = run(capsys, "verify", out, "--runtime-version", older, "--no-parity")
    assert code == 4
    one_line_error(err, f"ONNX Runtime {older} cannot run this bundle",
                   f"decode.ort: ORT format v{version}", f"prefill.ort: ORT format v{version}",
                   f"read from ONNX Runtime {first[0]}.{first[1]} on")
    copy = Path(shutil.copytree(out, tmp_path / "copy"))
    manifest = manifest_of(copy)
    manifest["onnx"] = {}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run(capsys, "verify", copy, "--runtime-version", older, "--no-parity")
    assert code == 4
    line = one_line_error(err, f"decode.ort: ORT format v{version}",
                          f"needs ONNX Runtime >= {first[0]}.{first[1]};")
    assert "IR version" not in line and "opset" not in line
    code, _, err = run(capsys, "verify", copy, "--runtime-version", f"{first[0]}.{first[1]}",
                       "--no-parity")
    assert code == 0, err


def test_verify_names_a_file_that_is_not_an_ort_flatbuffer(capsys, ort_bundle, tmp_path):
    """A .ort whose bytes match the manifest but whose identifier is not ORTM (the manifest
    rewritten to match): exit 1 naming the file."""
    out = Path(shutil.copytree(ort_bundle[0], tmp_path / "copy"))
    path = out / "decode.ort"
    data = bytearray(path.read_bytes())
    data[4:8] = b"XXXX"
    path.write_bytes(bytes(data))
    manifest = manifest_of(out)
    manifest["files"]["decode.ort"]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run(capsys, "verify", out, "--no-parity")
    assert code == 1
    one_line_error(err, "decode.ort", "not a valid ORT format file", "ORTM")


def test_format_ort_is_refused_for_a_profile_that_does_not_load_it(capsys, tmp_path_factory,
                                                                  tiny_dir, tmp_path):
    from helpers.static_fixtures import static_artifact_path

    from slmedge.exporter.bundle.build import BUNDLE_FORMATS
    from slmedge.tools.cli.bundle import BUNDLE_FORMATS_CHOICES

    assert BUNDLE_FORMATS_CHOICES == BUNDLE_FORMATS
    artifact = static_artifact_path(tmp_path_factory, tiny_dir)
    out = tmp_path / "b"
    code, _, err = run(capsys, "bundle", artifact, "--profile", "android-qnn-htp", "-o", out,
                       "--format", "ort")
    assert code == 2
    one_line_error(err, "android-qnn-htp loads onnx", "--format ort")
    assert not out.exists()
