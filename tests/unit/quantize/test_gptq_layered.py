"""gptq-act layer by layer (gptq_layered.py) against a straightforward reference.

The reference runs the *whole* graph (gptq.collect_hessians: an ONNX Runtime session with
the activations as extra outputs), with the layers before the one measured carrying the
dequantized GPTQ weights as plain initializers. The layered pass must give the same
Hessians and the same integer weights, while holding one layer's Hessians at a time.
"""

import gc
import weakref

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from slmedge.exporter.quantize.calibration import KVCacheCalibrationReader
from slmedge.exporter.quantize.gptq import collect_hessians, dequantize, gptq_quantize
from slmedge.exporter.quantize.gptq_layered import gptq_layered, plan_segments
from slmedge.exporter.quantize.graph import analyze, fold_weight_transposes
from slmedge.exporter.quantize.pack_matmuls import pack_shared_input_matmuls
from slmedge.exporter.quantize.recipe import CalibrationConfig

CALIB = CalibrationConfig(prefill_samples=3, decode_samples=5, prefill_tokens=24, max_past=40)
BLOCK = 32


@pytest.fixture(scope="module")
def prepared(tiny_artifact, tmp_path_factory):
    """The fused tiny Llama as the quantizer sees it (tied head folded, q/k/v and gate/up
    packed), saved; its weight MatMuls by layer; calibration samples with real caches."""
    model = onnx.load(str(tiny_artifact("llama") / "model.onnx"))
    fold_weight_transposes(model)
    pack_shared_input_matmuls(model)
    path = tmp_path_factory.mktemp("layered") / "prepared.onnx"
    onnx.save(model, str(path))
    facts = analyze(model)
    ids = list(np.random.default_rng(0).integers(6, 128, 400))
    samples = list(KVCacheCalibrationReader(path, ids, CALIB).samples())
    assert any(s["past_key_values.0.key"].shape[2] > 0 for s in samples)  # decode samples too
    return model, path, facts, samples


def _node(model, name):
    return next(n for n in model.graph.node if n.name == name)


def _weight(model, node):
    init = next(t for t in model.graph.initializer if t.name == node.input[1])
    return numpy_helper.to_array(init).astype(np.float64)


def _with_weights(model, path, replaced):
    """A copy of ``model`` saved at ``path`` whose MatMuls named in ``replaced`` read the
    given float weights instead."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for name, w in replaced.items():
        node = _node(copy, name)
        node.input[1] = node.input[1] + "_gptq"
        copy.graph.initializer.append(numpy_helper.from_array(w.astype(np.float32), node.input[1]))
    onnx.save(copy, str(path))
    return path


def test_each_layer_matches_the_whole_graph_reference(prepared, tmp_path):
    model, path, facts, samples = prepared
    targets = {w.node: BLOCK for w in facts.weight_matmuls}
    seen = {}
    result = gptq_layered(model, targets, samples,
                          on_hessians=lambda layer, hs: seen.update(
                              {layer: {a: h.copy() for a, h in hs.items()}}))
    assert list(seen) == [0, 1, None]  # two decoder layers, then the lm_head
    assert len(result.quantized) == len(targets)

    by_layer = {}
    for w in facts.weight_matmuls:
        by_layer.setdefault(w.layer, []).append(w.node)
    replaced = {}
    for layer in (0, 1, None):
        names = by_layer[layer] if layer is not None else [facts.lm_head]
        mats = [_node(model, n) for n in names]
        inputs = {m.input[0]: _weight(model, m).shape[0] for m in mats}
        ref_model = _with_weights(model, tmp_path / f"ref{layer}.onnx", replaced)
        want = collect_hessians(ref_model, inputs, lambda: iter(samples))
        assert set(seen[layer]) == set(inputs)
        for a in inputs:
            np.testing.assert_allclose(seen[layer][a], want[a], rtol=1e-5,
                                       atol=1e-6 * np.abs(want[a]).max())
        for m in mats:
            w = _weight(model, m)
            j, scale, zero = gptq_quantize(w, want[m.input[0]], BLOCK)
            got_j, got_scale, got_zero = result.quantized[m.output[0]]
            np.testing.assert_array_equal(got_scale, scale)  # the grid: from the weights alone
            np.testing.assert_array_equal(got_zero, zero)
            # integer weights: the same up to a rare tie flipped by float summation order
            assert (got_j == j).mean() > 0.995, (m.name, (got_j == j).mean())
            replaced[m.name] = dequantize(j, scale, zero, BLOCK)

    # sequential: layer 1 saw what the quantized layer 0 produces, not the float graph's
    layer1 = by_layer[1]
    inputs = {_node(model, n).input[0]: _weight(model, _node(model, n)).shape[0] for n in layer1}
    float_h = collect_hessians(path, inputs, lambda: iter(samples))
    a = next(iter(inputs))
    assert np.abs(seen[1][a] - float_h[a]).max() > 1e-4 * np.abs(float_h[a]).max()


def test_one_layer_of_hessians_alive_at_a_time(prepared):
    model, _path, facts, samples = prepared
    targets = {w.node: BLOCK for w in facts.weight_matmuls}
    alive: list[weakref.ref] = []

    def check(layer, hessians):
        gc.collect()
        assert not [r for r in alive if r() is not None], f"layer {layer}: earlier Hessians alive"
        alive.extend(weakref.ref(h) for h in hessians.values())

    result = gptq_layered(model, targets, samples, on_hessians=check)
    records = {r.layer: r for r in result.layers}
    # layer 0: q/k/v packed (K=64), o_proj (64), gate/up packed (64), down_proj (K=128)
    assert records[0].hessians == 4
    assert records[0].hessian_bytes == (3 * 64 * 64 + 128 * 128) * 8
    assert records[None].hessians == 1  # the lm_head's input
    assert result.peak_hessian_bytes == records[0].hessian_bytes
    assert result.peak_hessian_bytes < sum(r.hessian_bytes for r in result.layers)


def test_segments_hand_on_only_what_later_layers_read(prepared):
    model, _path, facts, _samples = prepared
    segments = plan_segments(model, [w.node for w in facts.weight_matmuls])
    assert [s.layer for s in segments] == [0, 1, None]
    every = [i for s in segments for i in s.nodes]
    assert len(every) == len(set(every))  # each node runs in one segment
    graph_inputs = {i.name for i in model.graph.input}
    # the second layer reads no cache of the first one, and nothing after it reads its own
    assert "past_key_values.0.key" not in segments[1].reads
    assert not any(t.startswith("past_key_values.1") for t in segments[2].reads)
    # what crosses from layer 0 to the rest: the residual stream and sequence bookkeeping,
    # a handful of tensors, none of them a graph input
    assert 0 < len(segments[0].frontier) <= 6
    assert not set(segments[0].frontier) & graph_inputs


def test_a_weight_that_is_not_a_constant_matmul_is_refused(prepared):
    model, _path, facts, samples = prepared
    gqa = next(n.name for n in model.graph.node if n.op_type == "GroupQueryAttention")
    with pytest.raises(ValueError, match="MatMuls with a constant weight"):
        gptq_layered(model, {gqa: BLOCK}, samples)
    with pytest.raises(ValueError, match="no node named"):
        plan_segments(model, ["nope"])


def test_column_slices_give_the_whole_weights_result():
    from slmedge.exporter.quantize.gptq_layered import _gptq_by_columns

    rng = np.random.default_rng(5)
    w = rng.normal(size=(64, 40)).astype(np.float32)
    x = rng.normal(size=(256, 64)) @ (np.eye(64) + rng.normal(size=(64, 64)) / 8)
    h = x.T @ x / len(x)
    whole = gptq_quantize(w.astype(np.float64), h, BLOCK)
    sliced = _gptq_by_columns(w, h, BLOCK, budget=64 * 8 * 3 * 7)  # 7 columns a slice
    for a, b in zip(whole, sliced, strict=True):
        np.testing.assert_array_equal(a, b)
