"""Execution-provider selection: fallback with a notice, --strict, plugin QNN, placement record."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from slmedge.runtimes.errors import (
    EXIT_UNSUPPORTED,
    ArtifactError,
    ProviderUnavailable,
    UnsupportedOp,
)
from slmedge.runtimes.sessions.onnx_decoder import make_session
from slmedge.runtimes.sessions.providers import availability, placement_of, selection_of, session_report

HAS_QNN = importlib.util.find_spec("onnxruntime_qnn") is not None
needs_qnn = pytest.mark.skipif(not HAS_QNN, reason="onnxruntime-qnn is not installed here "
                               "(wheels: Linux x86_64 / Windows, Python >= 3.11)")
QNN = ("QNNExecutionProvider", {"backend_type": "htp", "soc_model": "43", "htp_arch": "73"})
CPU = ("CPUExecutionProvider", {})


def _save(tmp_path, nodes, x_shape, name="m.onnx", inits=()):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    path = tmp_path / name
    onnx.save(model, path)
    return path


@pytest.fixture
def mixed_model(tmp_path):
    """MatMul -> Relu -> Erf with static shapes: QNN HTP takes the first two, not Erf."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.linspace(-1, 1, 16).tolist())
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="mm"),
             helper.make_node("Relu", ["a"], ["b"], name="relu"),
             helper.make_node("Erf", ["b"], ["y"], name="erf")]
    return _save(tmp_path, nodes, [2, 4], inits=[w])


@pytest.fixture
def dynamic_model(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    return _save(tmp_path, nodes, ["batch", 4], "dyn.onnx")


def _run(session):
    return session.run(None, {"x": np.ones((2, 4), np.float32)})[0]


def test_cpu_session_records_placement_and_selection(mixed_model):
    s = make_session(mixed_model, providers=[CPU])
    place = placement_of(s)
    assert place.total_nodes == 3 and place.nodes_by_provider == {"CPUExecutionProvider": 3}
    assert place.ops_by_provider["CPUExecutionProvider"] == {"MatMul": 1, "Relu": 1, "Erf": 1}
    assert place.cpu_nodes == []  # no accelerator was asked: CPU is not a fallback here
    assert selection_of(s).used == ["CPUExecutionProvider"]
    report = session_report(s)
    assert report["selection"]["skipped"] == [] and report["placement"]["total_nodes"] == 3


def test_missing_provider_falls_back_with_a_notice(mixed_model, capsys):
    s = make_session(mixed_model, providers=[("CoreMLExecutionProvider", {}), CPU])
    err = capsys.readouterr().err
    assert "CoreMLExecutionProvider not used" in err and "falling back to CPUExecutionProvider" in err
    assert "CPUExecutionProvider" in err.split("available:")[1]  # says what exists
    sel = selection_of(s)
    assert sel.used == ["CPUExecutionProvider"]
    assert sel.skipped[0]["provider"] == "CoreMLExecutionProvider"
    np.testing.assert_allclose(_run(s), _run(make_session(mixed_model)))


def test_strict_makes_a_missing_provider_an_error(mixed_model):
    with pytest.raises(ProviderUnavailable) as info:
        make_session(mixed_model, providers=[("NnapiExecutionProvider", {}), CPU], strict=True)
    assert info.value.exit_code == EXIT_UNSUPPORTED
    assert "NnapiExecutionProvider" in str(info.value) and "--strict" in str(info.value)


def test_strict_on_cpu_only_profile_is_fine(mixed_model):
    s = make_session(mixed_model, providers=[CPU], strict=True)
    assert selection_of(s).cpu_fallback_allowed is True  # nothing to fall back from


def test_only_unavailable_providers_end_on_cpu(mixed_model, capsys):
    s = make_session(mixed_model, providers=[("CoreMLExecutionProvider", {})])
    assert s.get_providers() == ["CPUExecutionProvider"]
    assert "falling back to CPUExecutionProvider" in capsys.readouterr().err


def test_corrupt_file_is_an_artifact_error_not_a_fallback(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model" * 10)
    with pytest.raises(ArtifactError):
        make_session(bad, providers=[("CoreMLExecutionProvider", {}), CPU])


def test_unknown_plugin_reason_names_the_package(monkeypatch):
    from slmedge.runtimes.sessions import providers

    monkeypatch.setitem(providers.PLUGIN_PROVIDERS, "FakePluginExecutionProvider",
                        ("slmedge_no_such_plugin", "onnxruntime-fake"))
    assert "pip install onnxruntime-fake" in availability("FakePluginExecutionProvider")


# -- QNN HTP (emulator on x86_64 Linux) -----------------------------------------------------


@pytest.mark.qnn
@needs_qnn
def test_qnn_plugin_registers_and_places_nodes(mixed_model):
    assert availability("QNNExecutionProvider") is None
    s = make_session(mixed_model, providers=[QNN, CPU])
    place = placement_of(s)
    assert place.nodes_by_provider == {"QNNExecutionProvider": 2, "CPUExecutionProvider": 1}
    assert place.cpu_nodes == [("erf", "Erf")] and place.cpu_ops == {"Erf": 1}
    # HTP computes fp32 graphs in fp16: close, not bit-equal.
    np.testing.assert_allclose(_run(s), _run(make_session(mixed_model)), atol=2e-2)


@pytest.mark.qnn
@needs_qnn
@pytest.mark.parametrize("kwargs", [{"allow_cpu_fallback": False}, {"strict": True}])
def test_qnn_disabled_cpu_fallback_names_the_ops(mixed_model, kwargs):
    with pytest.raises(UnsupportedOp) as info:
        make_session(mixed_model, providers=[QNN, CPU], **kwargs)
    assert "Erf x1" in str(info.value) and "1 of 3 nodes" in str(info.value)
    assert info.value.exit_code == EXIT_UNSUPPORTED


@pytest.mark.qnn
@needs_qnn
def test_qnn_full_offload_runs_without_cpu(tmp_path):
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.linspace(-1, 1, 16).tolist())
    path = _save(tmp_path, [helper.make_node("MatMul", ["x", "w"], ["a"], name="mm"),
                            helper.make_node("Relu", ["a"], ["y"], name="relu")], [2, 4],
                 inits=[w])
    s = make_session(path, providers=[QNN, CPU], strict=True)
    assert placement_of(s).nodes_by_provider == {"QNNExecutionProvider": 2}
    assert selection_of(s).cpu_fallback_allowed is False


@pytest.mark.qnn
@needs_qnn
def test_qnn_leaves_dynamic_shapes_to_cpu_visibly(dynamic_model, capsys):
    s = make_session(dynamic_model, providers=[QNN, CPU])
    assert placement_of(s).nodes_by_provider == {"CPUExecutionProvider": 1}
    assert "took none of the 1 nodes" in capsys.readouterr().err
    with pytest.raises(UnsupportedOp, match="1 of 1 nodes"):
        make_session(dynamic_model, providers=[QNN, CPU], strict=True)


def _rms_norm_model(tmp_path, weight_first: bool):
    """torch's RMSNorm chain; ``Mul(weight, x)`` makes QNN 2.7.0 fail to finalize its graph."""
    inits = [helper.make_tensor("w", TensorProto.FLOAT, [64], np.linspace(0.5, 1.5, 64).tolist()),
             helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
             helper.make_tensor("eps", TensorProto.FLOAT, [], [1e-5]),
             helper.make_tensor("axes", TensorProto.INT64, [1], [-1])]
    nodes = [helper.make_node("Pow", ["x", "two"], ["p"], name="pow"),
             helper.make_node("ReduceMean", ["p", "axes"], ["m"], name="mean", keepdims=1),
             helper.make_node("Add", ["m", "eps"], ["a"], name="add"),
             helper.make_node("Sqrt", ["a"], ["s"], name="sqrt"),
             helper.make_node("Reciprocal", ["s"], ["r"], name="rsqrt"),
             helper.make_node("Mul", ["x", "r"], ["n"], name="norm"),
             helper.make_node("Mul", ["w", "n"] if weight_first else ["n", "w"], ["y"],
                              name="scale")]
    return _save(tmp_path, nodes, [1, 1, 64], f"rms{int(weight_first)}.onnx", inits=inits)


@pytest.mark.qnn
@needs_qnn
def test_qnn_session_failure_falls_back_or_fails_strict(tmp_path, capsys):
    model = _rms_norm_model(tmp_path, weight_first=True)
    s = make_session(model, providers=[QNN, CPU])
    assert s.get_providers() == ["CPUExecutionProvider"]
    assert "Failed to finalize QNN graph" in capsys.readouterr().err
    assert "finalize" in selection_of(s).skipped[0]["reason"]
    with pytest.raises(ProviderUnavailable, match="finalize"):
        make_session(model, providers=[QNN, CPU], strict=True)


@pytest.mark.qnn
@needs_qnn
def test_constants_second_workaround_lets_qnn_take_rms_norm(tmp_path):
    from slmedge.exporter.onnx.static_shapes import constants_second

    path = _rms_norm_model(tmp_path, weight_first=True)
    model = onnx.load(path)
    assert constants_second(model) == 1  # only Mul(w, n); Add(m, eps) is already in order
    onnx.save(model, path)
    s = make_session(path, providers=[QNN, CPU], strict=True)
    assert placement_of(s).nodes_by_provider == {"QNNExecutionProvider": 7}


@pytest.mark.qnn
@needs_qnn
def test_qnn_that_takes_no_node_is_reported(mixed_model, capsys):
    no_soc = ("QNNExecutionProvider", {"backend_type": "htp", "soc_model": "99999"})
    s = make_session(mixed_model, providers=[no_soc, CPU])
    assert "took none of the 3 nodes" in capsys.readouterr().err
    assert placement_of(s).nodes_by_provider == {"CPUExecutionProvider": 3}
    with pytest.raises(UnsupportedOp, match="3 of 3 nodes"):
        make_session(mixed_model, providers=[no_soc, CPU], strict=True)


@needs_qnn
def test_qnn_by_name_alone_would_run_on_cpu(mixed_model):
    """Why plugin EPs go through their devices: passed by name, ORT drops QNN silently."""
    from slmedge.runtimes.sessions.providers import register_plugin_provider

    assert register_plugin_provider("QNNExecutionProvider") is None
    s = ort.InferenceSession(str(mixed_model), providers=[QNN, "CPUExecutionProvider"])
    assert s.get_providers() == ["CPUExecutionProvider"]


# -- real NNAPI / CoreML: only on a device that has them ---------------------------------------


@pytest.mark.parametrize("profile_name, provider", [
    pytest.param("android-nnapi", "NnapiExecutionProvider", marks=pytest.mark.nnapi),
    pytest.param("ios-coreml", "CoreMLExecutionProvider", marks=pytest.mark.coreml),
    pytest.param("macos-coreml", "CoreMLExecutionProvider", marks=pytest.mark.coreml),
])
def test_device_provider_takes_the_graph(mixed_model, profile_name, provider):
    from slmedge.device_profiles import load_profile

    reason = availability(provider)
    if reason is not None:
        pytest.skip(f"needs a device with {provider}: {reason}")
    profile = load_profile(profile_name)
    s = make_session(mixed_model, providers=profile.provider_specs())
    assert placement_of(s).nodes_by_provider.get(provider, 0) >= 1
    np.testing.assert_allclose(_run(s), _run(make_session(mixed_model)), atol=1e-2)
