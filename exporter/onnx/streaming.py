"""Streaming export: trace an empty model, attach lazy weights, clean up and fuse in memory,
write once (one tensor at a time).

The graph is the in-memory export's (``onnx_export.export_decoder`` + ``fuse_onnx_file``):
tests/parity/test_streaming_export.py compares op counts, initializer names, shapes and
bytes for every tiny architecture and SmolLM2's GGUF.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path

from .graph_writer import graph_without_weights, save_graph
from .lazy_weights import attach_weights
from slmedge.exporter.onnx.convert import DEFAULT_OPSET, OnnxExportInfo, trace_decoder
from slmedge.exporter.passes.cleanup import CleanupPass
from slmedge.exporter.passes.tied_head import fp16_tied_head

Say = Callable[[str], None]

#: Weights in ``model.onnx.data`` from 1 GiB (protobuf's limit is 2 GB): ONNX Runtime loads a
#: single-file graph with its proto and its tensors both in memory. Measured on the 0.5B
#: Qwen-shaped fp32 graph (1.98 GB): a session took 4.20 GB single-file, 2.53 GB external.
EXTERNAL_DATA_FROM = 1 << 30


def session_weights_bytes(model) -> int:
    """Bytes ONNX Runtime's CPU session holds for the weights: fp16 / bf16 ones as fp32 (on
    x86 it casts them to fp32 at load, as it has no fp16 kernels), the others as they are.
    A single-file fp16 graph adds the whole proto on top: Qwen2.5-0.5B fp16 (0.99 GB) peaked at
    3.70 GB in its session single-file, 2.75 GB with external data (measured here)."""
    return sum(p.numel() * max(p.element_size(), 4) if p.is_floating_point()
               else p.numel() * p.element_size() for p in model.parameters())


def decoder_layers(model, layers: int):
    """The decoder's layer modules: the first ``ModuleList`` of ``layers`` modules (HF's
    ``model.layers`` / GPT-2's ``transformer.h``), or None when there is none."""
    import torch

    return next((m for m in model.modules()
                 if isinstance(m, torch.nn.ModuleList) and len(m) == layers), None)


@contextlib.contextmanager
def trace_progress(model, layers: int, say: Say):
    """Report each decoder layer as torch.export's forward pass reaches it, with an ETA for
    the rest of that pass from the layers after the first (a forward pre-hook per layer; hooks
    run in the non-strict trace). The ETA covers the forward pass only: torch.onnx then
    translates the traced graph, which took most of the trace's time (Qwen2.5-0.5B under load
    15: setup 18 s, the 24 layers 52 s, the translation 154 s of a 224 s trace)."""
    import torch

    modules = decoder_layers(model, layers)
    if modules is None:
        yield
        return
    seen: set[int] = set()
    first: list[float] = []  # when the first layer was reached

    def hook(index: int):
        def report(_module, _args):
            # strict (dynamo) export, torch.onnx's fallback, would trace the hook: stay out
            if index in seen or torch.compiler.is_dynamo_compiling():
                return  # seen: torch.export may run the forward more than once
            seen.add(index)
            now = time.perf_counter()
            if len(seen) == 1:  # the time before it is torch.export's setup, not a layer's
                first.append(now)
                say(f"tracing: layer {index + 1}/{layers} reached (forward pass)")
                return
            eta = (now - first[0]) / (len(seen) - 1) * (layers - len(seen))
            say(f"tracing: layer {index + 1}/{layers} reached, forward pass ETA {eta:.0f} s "
                "(then the ONNX translation)")
        return report

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(modules)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def trace_streamed(model, spec, *, opset: int = DEFAULT_OPSET, say: Say | None = None,
                   replicate: bool = True):
    """Trace an empty-parameter model: with ``replicate``, two small traces replicated to its
    layer count (layer_template.py), which is the full trace's graph (Qwen2.5-0.5B: the same
    6100 nodes; 158 s instead of 334 s at load 18, 59 s instead of 78 s at load 6:
    tools/bench/results/trace_template.json); the whole model when the layers
    are not all of one kind, there are fewer than ``layer_template.MIN_LAYERS``, or the traces
    do not determine the graph. Returns (ir.Model, inputs, outputs, how: "full (why)" or
    "replicated: ...")."""
    from .layer_template import LARGE, SMALL, NotReplicable, trace_template

    say = say or (lambda _m: None)
    layers = spec.kv_layout(model.config)[0]
    reason = "replication off"
    if replicate:
        try:
            graph, inputs, outputs = trace_template(model, spec, opset=opset, say=say)
            return graph, inputs, outputs, \
                f"replicated: {SMALL}- and {LARGE}-layer traces -> {layers} layers"
        except NotReplicable as e:
            reason = str(e)
            say(f"tracing the whole model: {reason}")
    with trace_progress(model, layers, say):
        graph, inputs, outputs = trace_decoder(model, spec, opset=opset)
    return graph, inputs, outputs, f"full ({reason})"


def build_streamed_graph(streamed, *, opset: int = DEFAULT_OPSET, fuse_options=None,
                         say: Say | None = None, phases: dict[str, float] | None = None,
                         details: dict | None = None, replicate: bool = True):
    """The cleaned-up (and, with ``fuse_options``, fused) ``onnx_ir`` model of a
    :class:`~slmedge.exporter.sources.load.StreamedModel`, every weight still on disk.
    Returns (ir.Model, inputs, outputs, fusion report or None); ``phases`` (when given)
    receives the seconds of ``trace`` (torch.onnx) and ``passes`` (weights, cleanup, fusion),
    ``details`` how it was traced (``trace``: :func:`trace_streamed`)."""
    say = say or (lambda _m: None)
    phases = {} if phases is None else phases
    model, spec = streamed.model, streamed.spec
    torch_dtype = next(model.parameters()).dtype
    say("tracing the model (weights are not loaded)")
    t0 = time.perf_counter()
    graph, inputs, outputs, how = trace_streamed(model, spec, opset=opset, say=say,
                                                 replicate=replicate)
    if details is not None:
        details["trace"] = how
    t1 = time.perf_counter()
    say(f"traced in {t1 - t0:.1f} s")
    phases["trace"] = round(t1 - t0, 2)
    attach_weights(graph.graph, model, streamed.weights, torch_dtype)
    CleanupPass()(graph)
    if fuse_options is None:
        fp16_tied_head(graph, say)
    fusion = None
    if fuse_options is not None:
        from slmedge.exporter.passes import fuse_model

        say("fusing the graph for ONNX Runtime (GroupQueryAttention, norms, GELU)")
        fusion = fuse_model(graph, fuse_options)
    phases["passes"] = round(time.perf_counter() - t1, 2)
    return graph, inputs, outputs, fusion


def export_streamed(streamed, path: Path, *, opset: int = DEFAULT_OPSET,
                    external_data: bool | None = None, fuse_options=None,
                    say: Say | None = None):
    """Write the graph of ``streamed`` to ``path``; returns (OnnxExportInfo, fusion report or
    None). ``external_data=None``: when the weights as ONNX Runtime's session holds them
    (:func:`session_weights_bytes`) reach :data:`EXTERNAL_DATA_FROM`. The info's
    ``phases`` has the seconds of trace, passes and write."""
    t0 = time.perf_counter()
    phases: dict[str, float] = {}
    details: dict = {}
    graph, inputs, outputs, fusion = build_streamed_graph(
        streamed, opset=opset, fuse_options=fuse_options, say=say, phases=phases,
        details=details)
    use_external = session_weights_bytes(streamed.model) >= EXTERNAL_DATA_FROM \
        if external_data is None else external_data
    layers = streamed.spec.kv_layout(streamed.model.config)[0]
    t_write = time.perf_counter()
    save_graph(graph, path, external_data=use_external, say=say, layers=layers)
    phases["write"] = round(time.perf_counter() - t_write, 2)
    return OnnxExportInfo(path, opset, inputs, outputs, use_external,
                          time.perf_counter() - t0, phases, details["trace"]), fusion


def export_unwritten(streamed, path: Path, *, opset: int = DEFAULT_OPSET, fuse_options=None,
                     say: Say | None = None):
    """The graph of ``streamed`` as :func:`export_streamed` builds it, but not written: returns
    (OnnxExportInfo, fusion report or None, (ModelProto, UnwrittenSource)) for the quantizer
    to read each weight straight from the checkpoint (quantize on write: no fp32 ``.data``).
    ``path`` is where the quantized graph will be; the info's ``write`` phase is the seconds
    of the weightless proto."""
    t0 = time.perf_counter()
    phases: dict[str, float] = {}
    details: dict = {}
    graph, inputs, outputs, fusion = build_streamed_graph(
        streamed, opset=opset, fuse_options=fuse_options, say=say, phases=phases,
        details=details)
    t_write = time.perf_counter()
    unwritten = graph_without_weights(graph)
    phases["write"] = round(time.perf_counter() - t_write, 2)
    return OnnxExportInfo(path, opset, inputs, outputs, False, time.perf_counter() - t0,
                          phases, details["trace"]), fusion, unwritten
