"""A graph replicated from two small traces (exporter/onnx/layer_template.py) is the full trace:
the same nodes (op types, names, inputs, outputs, attributes, metadata, in order), the same
initializers, graph inputs and outputs; and after the export's passes (lazy weights, cleanup,
fusion) the same graph with the same bytes in every weight."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.tiny_models import tiny_config

from slmedge.exporter.onnx.layer_template import LARGE, NotReplicable, fit, trace_template
from slmedge.exporter.onnx.lazy_weights import attach_weights
from slmedge.exporter.passes import FusionOptions, fuse_model
from slmedge.exporter.passes.cleanup import CleanupPass
from slmedge.exporter.sources.load import open_source
from slmedge.exporter.onnx.streaming import trace_streamed

LAYERS = LARGE + 1  # a layer past the large template: the fits extrapolate (CI time: not 7)


def test_fit_is_affine_in_layer_and_count():
    f = fit([((1, 3), "val_10/layers.1"), ((1, 5), "val_30/layers.1"),
             ((2, 5), "val_37/layers.2"), ((3, 5), "val_44/layers.3")])
    assert f(1, 3) == "val_10/layers.1"
    assert f(6, 9) == "val_105/layers.6"  # 10 + 7*(6-1) + 10*(9-3)
    assert fit([((0, 3), "logits"), ((0, 5), "logits")])(0, 40) == "logits"


@pytest.mark.parametrize("samples, why", [
    ([((1, 5), "a_1"), ((2, 5), "a_3"), ((3, 5), "a_4")], "not affine"),
    ([((1, 5), "a_1"), ((3, 5), "a_2")], "not affine"),  # slope 1/2
    ([((1, 5), "a_1"), ((2, 5), "b_2")], "beyond their numbers"),
    ([((1, 5), "x"), ((2, 5), None)], "missing"),
])
def test_fit_refuses_what_is_not_a_function_of_the_layer(samples, why):
    with pytest.raises(NotReplicable, match=why):
        fit(samples)


def save_deep_tiny(model_type: str, directory: Path) -> Path:
    """The tiny checkpoint of ``model_type`` with LAYERS layers (random weights, seed 0)."""
    import torch
    from helpers.tiny_models import tiny_tokenizer
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type)
    config.num_hidden_layers = LAYERS
    if getattr(config, "layer_types", None):
        kinds = list(config.layer_types)
        config.layer_types = [kinds[i % len(kinds)] for i in range(LAYERS)]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    with torch.no_grad():  # norms away from all-ones: the deduplication must not merge them
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def node_list(model):
    return [(n.domain, n.op_type, n.overload, n.name,
             [v.name if v is not None else None for v in n.inputs],
             [(v.name, str(v.shape), str(v.type)) for v in n.outputs],
             [(a.name, a.type, repr(a.value) if a.type.name not in ("TENSOR",)
               else a.value.numpy().tobytes()) for a in n.attributes.values()],
             dict(n.metadata_props)) for n in model.graph]


def graph_interface(model):
    g = model.graph
    return ([(v.name, str(v.shape), str(v.type)) for v in g.inputs],
            [(v.name, str(v.shape), str(v.type)) for v in g.outputs],
            [(k, tuple(v.shape), v.dtype) for k, v in g.initializers.items()],
            dict(g.metadata_props), dict(model.graph.opset_imports))


def assert_same(full, replicated, *, weights: bool):
    a, b = node_list(full), node_list(replicated)
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x == y, f"node {i} differs"
    assert graph_interface(full) == graph_interface(replicated)
    if weights:
        for name, value in full.graph.initializers.items():
            got = replicated.graph.initializers[name].const_value.numpy()
            want = value.const_value.numpy()
            assert (got.dtype, got.shape) == (want.dtype, want.shape), name
            assert got.tobytes() == want.tobytes(), f"{name}: bytes differ"


# CI time (~55 s a case at 7 layers): qwen2 / qwen3 are llama with q/k/v biases / q-k norms;
# phi3 (packed projections) and gpt2 (its own layer) are the other structures
@pytest.mark.parametrize("model_type", ["llama", "phi3", "gpt2"])
def test_replicated_graph_is_the_full_trace(model_type, tmp_path):
    streamed = open_source(str(save_deep_tiny(model_type, tmp_path / model_type)))
    model, spec = streamed.model, streamed.spec
    messages: list[str] = []
    full, *_, how = trace_streamed(model, spec, replicate=False)
    assert how.startswith("full")
    replicated, inputs, outputs = trace_template(model, spec, min_layers=0,
                                                 say=messages.append)
    assert inputs == [v.name for v in full.graph.inputs]
    assert outputs == [v.name for v in full.graph.outputs]
    assert_same(full, replicated, weights=False)
    assert f"tracing: layer {LAYERS}/{LAYERS} replicated" in messages
    # the export's passes on both: lazy weights, cleanup, fusion; then every weight's bytes
    options = FusionOptions.from_hf_config(model.config)
    for graph in (full, replicated):
        attach_weights(graph.graph, model, streamed.weights, next(model.parameters()).dtype)
        CleanupPass()(graph)
        fuse_model(graph, options)
    assert_same(full, replicated, weights=True)


def test_layers_of_two_kinds_are_traced_whole(tiny_dir):
    """Gemma 3 alternates sliding and full attention: not replicated (the info says why; the
    kinds are checked before the layer count, so the 2-layer tiny model shows it)."""
    streamed = open_source(str(tiny_dir("gemma3_text")))
    with pytest.raises(NotReplicable, match="several kinds"):
        trace_template(streamed.model, streamed.spec, min_layers=0)
    messages: list[str] = []
    _, _, _, how = trace_streamed(streamed.model, streamed.spec, replicate=True,
                                  say=messages.append)
    assert how.startswith("full (layers of several kinds")
    assert any(m.startswith("tracing: layer 1/") for m in messages)  # the per-layer progress
