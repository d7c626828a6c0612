"""CLI: slmedge profiles list|show, slmedge check, --profile / --strict on generate and bench."""

from __future__ import annotations

import importlib.util
import json

import pytest
from helpers.static_fixtures import static_artifact_path

from slmedge.runtimes.errors import EXIT_OK, EXIT_UNSUPPORTED, EXIT_USAGE
from slmedge.tools.cli.app import main

HAS_QNN = importlib.util.find_spec("onnxruntime_qnn") is not None
needs_qnn = pytest.mark.skipif(not HAS_QNN, reason="onnxruntime-qnn is not installed here "
                               "(wheels: Linux x86_64 / Windows, Python >= 3.11)")


@pytest.fixture(scope="module")
def static_llama(tmp_path_factory, tiny_dir):
    return static_artifact_path(tmp_path_factory, tiny_dir, "llama")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_profiles_list_json(capsys):
    code, out, _ = run(capsys, "profiles", "list", "--json")
    assert code == EXIT_OK
    rows = json.loads(out)
    names = {r["name"] for r in rows}
    assert {"x86-cpu", "rpi5", "android-qnn-htp", "ios-coreml"} <= names
    qnn = next(r for r in rows if r["name"] == "android-qnn-htp")
    assert qnn["providers"][0] == "QNNExecutionProvider" and qnn["shapes"] == "static"


def test_profiles_list_table(capsys):
    code, out, _ = run(capsys, "profiles", "list")
    assert code == EXIT_OK and "rpi4" in out and "QNN > CPU" in out


def test_profiles_show_json_and_yaml(capsys, tmp_path):
    code, out, _ = run(capsys, "profiles", "show", "android-qnn-htp", "--json")
    doc = json.loads(out)
    assert code == EXIT_OK and doc["runtime"]["providers"][0]["options"]["soc_model"] == "43"
    user = tmp_path / "gen3.yaml"
    user.write_text("extends: android-qnn-htp\nruntime:\n  providers:\n"
                    "    - name: QNNExecutionProvider\n      options: {soc_model: '57'}\n")
    code, out, _ = run(capsys, "profiles", "show", str(user))
    assert code == EXIT_OK and "soc_model: '57'" in out and "extends: android-qnn-htp" in out


def test_profiles_show_bad_file_exits_2_naming_file_and_field(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: rpi5\nruntime:\n  providers:\n    - name: TurboExecutionProvider\n")
    code, out, err = run(capsys, "profiles", "show", str(bad))
    assert code == EXIT_USAGE and out == ""
    assert "bad.yaml" in err and "runtime.providers.0.name" in err and "QNNExecutionProvider" in err
    code, _, err = run(capsys, "profiles", "show", "pixel-42")
    assert code == EXIT_USAGE and "rpi5" in err


def test_check_table_json_and_strict(capsys, static_llama, tiny_artifact):
    code, out, _ = run(capsys, "check", str(static_llama), "--profile", "android-nnapi", "--json")
    doc = json.loads(out)
    assert code == EXIT_OK and doc["target"] == "NnapiExecutionProvider"
    assert [g["file"] for g in doc["graphs"]] == ["prefill.onnx", "decode.onnx"]
    code, out, _ = run(capsys, "check", str(tiny_artifact("llama")), "--profile", "ios-coreml")
    assert code == EXIT_OK
    assert "graph" in out and "reason" in out and "not fixed" in out  # the node/op/reason table
    code, _, err = run(capsys, "check", str(tiny_artifact("llama")), "--profile", "ios-coreml",
                       "--strict")
    assert code == EXIT_UNSUPPORTED and "would not run" in err


def test_generate_falls_back_with_notice_or_fails_strict(capsys, static_llama):
    code, out, err = run(capsys, "generate", str(static_llama), "--prompt", "Hello world",
                         "--max-new-tokens", "4", "--profile", "ios-coreml", "--json")
    assert code == EXIT_OK and len(json.loads(out)["tokens"]) >= 1
    assert "CoreMLExecutionProvider not used" in err
    code, out, err = run(capsys, "generate", str(static_llama), "--prompt", "Hello world",
                         "--max-new-tokens", "4", "--profile", "ios-coreml", "--strict")
    assert code == EXIT_UNSUPPORTED and "--strict" in err and out == ""


@pytest.mark.qnn
@needs_qnn
def test_generate_and_bench_on_qnn_htp_emulator(capsys, static_llama, tmp_path):
    args = ["--prompt", "It is a truth universally", "--max-new-tokens", "6", "--ignore-eos",
            "--json"]
    code, out, _ = run(capsys, "generate", str(static_llama), *args)
    cpu = json.loads(out)
    code, out, err = run(capsys, "generate", str(static_llama), *args, "--profile",
                         "android-qnn-htp", "--strict")
    assert code == EXIT_OK, err
    assert json.loads(out)["tokens"] == cpu["tokens"]
    code, out, err = run(capsys, "bench", str(static_llama), "--profile", "android-qnn-htp",
                         "--strict", "--prompt-tokens", "8", "--new-tokens", "4",
                         "--warmup", "0", "--repeats", "1", "--json")
    assert code == EXIT_OK, err
    placement = json.loads(out)["environment"]["node_placement"]
    for kind in ("prefill", "decode"):
        place = placement[kind]["placement"]
        assert place["nodes_by_provider"] == {"QNNExecutionProvider": place["total_nodes"]}
        assert placement[kind]["selection"]["cpu_fallback_allowed"] is False
