"""torch -> ONNX for a decoder with KV cache, through ``torch.onnx.export(dynamo=True)``.

The Hugging Face model is wrapped so that the graph has flat, named tensors in and out
(the contract in ``slmedge.runtimes.sessions.onnx_decoder``); the wrapper builds the
transformers cache object inside ``forward`` so ``torch.export`` traces it like any
other Python code.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slmedge.runtimes.errors import SlmEdgeError

from slmedge.exporter.architectures import ArchitectureSpec

DEFAULT_OPSET = 18  # ONNX Runtime >= 1.14; mobile builds of that age still load it
TWO_GB = 2 * 1024**3


def past_names(num_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def _cache_kwarg(model) -> str:
    # transformers renamed the forward argument `past_key_values` to `cache` (5.x; the old
    # name is deprecated and will go in 5.40). Use whichever this version takes.
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


class KVCacheWrapper(torch.nn.Module):
    """``(input_ids, attention_mask, position_ids, past...) -> (logits, present...)``."""

    def __init__(self, model, num_layers: int):
        super().__init__()
        self.model = model
        self.num_layers = num_layers
        self.cache_kwarg = _cache_kwarg(model)

    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        from transformers import DynamicCache

        # A cache of full (non-sliding) layers for every family: sliding-window attention
        # (Gemma 3) is applied by the mask, so every layer's cache has the same shape.
        cache = DynamicCache()
        for i in range(self.num_layers):
            cache.update(past_key_values[2 * i], past_key_values[2 * i + 1], i)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self.cache_kwarg: cache},
        )
        presents = []
        for layer in out.past_key_values.layers:
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


def example_inputs(spec: type[ArchitectureSpec], config, dtype, batch=2, seq=3, past=5):
    """Inputs for tracing. No dimension is 0 or 1: torch.export would specialize those."""
    layers, kv_heads, head_dim = spec.kv_layout(config)
    vocab = config.vocab_size
    input_ids = torch.randint(0, vocab, (batch, seq), dtype=torch.int64)
    attention_mask = torch.ones(batch, past + seq, dtype=torch.int64)
    position_ids = torch.arange(past, past + seq, dtype=torch.int64).repeat(batch, 1)
    kv = tuple(torch.randn(batch, kv_heads, past, head_dim, dtype=dtype) for _ in range(2 * layers))
    return input_ids, attention_mask, position_ids, kv


@dataclass
class OnnxExportInfo:
    path: Path
    opset: int
    input_names: list[str]
    output_names: list[str]
    external_data: bool
    seconds: float
    #: seconds per phase of ``seconds`` (streaming export: trace, passes, write)
    phases: dict[str, float] = field(default_factory=dict)
    #: how the graph was traced: "full", or "replicated: ..." (layer_template.py)
    trace: str = "full"


#: torch.export's own records in the graph's metadata: every parameter and symbol of the traced
#: program (torch-internal text no ONNX consumer reads). Dropped from every trace, so that a
#: graph replicated from small traces (layer_template.py) equals the full trace.
TRACE_RECORDS = ("pkg.torch.export.ExportedProgram.graph_signature",
                 "pkg.torch.export.ExportedProgram.range_constraints")


class ExportFailed(SlmEdgeError):
    """torch.export / ONNX translation failed."""


def trace_decoder(model, spec: type[ArchitectureSpec], *, opset: int = DEFAULT_OPSET):
    """Trace ``model`` (eval mode) to an ``onnx_ir`` model with the KV-cache contract; no
    cleanup. The parameters' data is not read (they may be empty: streaming export).
    Returns (ir.Model, input names, output names)."""
    config = model.config
    layers, _, _ = spec.kv_layout(config)
    dtype = next(model.parameters()).dtype
    wrapper = KVCacheWrapper(model, layers).eval()
    args = example_inputs(spec, config, dtype)
    batch = torch.export.Dim("batch")
    seq = torch.export.Dim("sequence_length")
    past = torch.export.Dim("past_sequence_length")
    total = torch.export.Dim("total_sequence_length")
    dynamic_shapes = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "past_key_values": tuple({0: batch, 2: past} for _ in range(2 * layers)),
    }
    inputs = ["input_ids", "attention_mask", "position_ids", *past_names(layers)]
    outputs = ["logits", *present_names(layers)]
    # torch.onnx prints its step log with print(); keep stdout clean for --json.
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings(), spec.export_patches():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                wrapper,
                args,
                dynamo=True,
                dynamic_shapes=dynamic_shapes,
                input_names=inputs,
                output_names=outputs,
                opset_version=opset,
                # onnxscript's default optimizer (its rewrite rules) took ~100 s of the
                # ~200 s SmolLM2-135M export; the cleanup below folds what matters in seconds.
                optimize=False,
                verbose=False,
                report=False,
            )
        except Exception as e:  # torch.export raises many types; report the first line
            raise ExportFailed(
                f"torch.onnx.export failed for {type(model).__name__}: "
                f"{str(e).strip().splitlines()[-1][:400]}"
            ) from e
    for key in TRACE_RECORDS:
        program.model.graph.metadata_props.pop(key, None)
    from .trace_names import canonical_trace

    canonical_trace(program.model, {"batch": ("input_ids", 0), "sequence_length": ("input_ids", 1),
                                    "past_sequence_length": (past_names(layers)[0], 2),
                                    "total_sequence_length": ("attention_mask", 1)})
    return program.model, inputs, outputs


def weights_bytes(model) -> int:
    """Bytes of the model's parameters (tied ones once), at their dtype."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def export_decoder(
    model,
    spec: type[ArchitectureSpec],
    path: Path,
    *,
    opset: int = DEFAULT_OPSET,
    external_data: bool | None = None,
) -> OnnxExportInfo:
    """Export ``model`` (eval mode, weights in memory) to ``path``, cleaned up, unfused.
    ``external_data=None``: only above 2 GB. (``slmedge export`` streams instead:
    :func:`slmedge.exporter.onnx.streaming.export_streamed`; this is the in-memory reference.)"""
    t0 = time.perf_counter()
    graph, inputs, outputs = trace_decoder(model, spec, opset=opset)
    from slmedge.exporter.passes.cleanup import CleanupPass

    CleanupPass()(graph)
    from slmedge.exporter.passes.tied_head import fp16_tied_head

    fp16_tied_head(graph)  # as the streamed export does (streaming.build_streamed_graph)
    use_external = weights_bytes(model) >= TWO_GB if external_data is None else external_data
    from .graph_writer import save_graph

    save_graph(graph, path, external_data=use_external)
    return OnnxExportInfo(path, opset, inputs, outputs, use_external, time.perf_counter() - t0)
