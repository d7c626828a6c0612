"""Calibrated QDQ quantization (int8, and 16-bit activations for NPUs) with ONNX Runtime's tools
(``onnxruntime.quantization.quantize_static``; the static-*shape* graphs' side is
``exporter/onnx/static_shapes_qdq.py``).

Which ops are quantized is decided per op type (``OP_POLICY``) plus one graph fact:
the *mask path* (the ``attention_mask`` arithmetic, the Add of the -3.4e38 mask to the
attention scores, and the Softmax) stays float in every scheme, because the mask
constants stretch any integer range until the real scores round to one value
(DESIGN.md: a tiny Llama with every op int8 fell to cosine 0.68; FC-only gave 0.998).
The decisions are returned as a table that goes into the manifest.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from .graph import GraphFacts
from .recipe import (
    CalibrationMethod,
    CalibrationPrefix,
    QdqWriter,
    QuantRecipe,
    QuantScheme,
    TensorPrecision,
)

Say = Callable[[str], None]

#: op type -> (int8-static decision, a16w8 decision, why). "weights" = weight MatMuls only.
OP_POLICY: dict[str, tuple[str, str, str]] = {
    "MatMul": ("weights", "all",
               "int8: weight MatMuls (per-channel weights, uint8 activations); attention "
               "MatMuls stay float. a16w8: every MatMul, 16-bit activations"),
    "Gather": ("float", "quantize", "int8: embedding stays float (lookup, no compute to save)"),
    "Add": ("float", "quantize", "bias and other adds: 16-bit in a16w8; the residual stream's "
            "Adds are kept float per node (keep_float: core._a16w8_kept_float, static_shapes_qdq); "
            "the mask Add is on the mask path"),
    "Mul": ("float", "quantize", "norm scale, rotary, gating: 16-bit in a16w8"),
    "Sub": ("float", "quantize", ""),
    "Div": ("float", "quantize", ""),
    "Neg": ("float", "quantize", "rotary half-rotation"),
    "Sigmoid": ("float", "quantize", "SiLU"),
    "Tanh": ("float", "quantize", "GELU (tanh form)"),
    "Pow": ("float", "quantize", "RMSNorm x^2: int8 ranges fail here (DESIGN.md), 16-bit kept"),
    "ReduceMean": ("float", "quantize", "RMSNorm mean"),
    "Sqrt": ("float", "quantize", "RMSNorm"),
    "Reciprocal": ("float", "quantize", "RMSNorm"),
    "LayerNormalization": ("float", "quantize", "norms never int8"),
    "SimplifiedLayerNormalization": ("float", "float", "contrib op: no QDQ form"),
    "Softmax": ("float", "float", "follows the mask Add; stays float (mask path)"),
    "Concat": ("float", "quantize", "KV-cache concat: 16-bit in a16w8"),
    "Transpose": ("float", "quantize", "data movement"),
    "Reshape": ("float", "quantize", "data movement"),
    "Slice": ("float", "quantize", "data movement"),
    "Expand": ("float", "quantize", "data movement"),
    "Unsqueeze": ("float", "quantize", "data movement"),
    "Squeeze": ("float", "quantize", "data movement"),
    "Split": ("float", "quantize", "data movement"),
}
MASK_PATH_REASON = "on the attention-mask path (mask arithmetic, mask Add, Softmax): float"
#: MinMax calibration one decoder layer at a time (qdq_layered.py), the ranges handed to
#: quantize_static as its calibration cache; False: ORT's calibrator on the whole augmented
#: graph (kept for comparison; entropy / percentile always take it)
QDQ_LAYERED = True


def _calib_method(method: CalibrationMethod):
    from onnxruntime.quantization import CalibrationMethod as OrtMethod

    return {CalibrationMethod.minmax: OrtMethod.MinMax, CalibrationMethod.entropy: OrtMethod.Entropy,
            CalibrationMethod.percentile: OrtMethod.Percentile}[method]


def _calib_extra(recipe: QuantRecipe) -> dict:
    cal = recipe.calibration
    extra = {}
    if cal.method is CalibrationMethod.percentile:
        extra["CalibPercentile"] = cal.percentile
    if cal.method is not CalibrationMethod.minmax:
        extra["CalibTensorRangeSymmetric"] = False
    return extra


def plan_static(model: onnx.ModelProto, facts: GraphFacts, recipe: QuantRecipe,
                keep_float: dict[str, str] | None = None) -> tuple[list[str], dict]:
    """The nodes to quantize and the per-op-type decision table (for the manifest).

    ``keep_float`` maps node names to the reason they stay float (graph facts found by the
    caller, e.g. the residual stream of a static graph); the reason lands in the table."""
    keep_float = keep_float or {}
    a16 = recipe.scheme is QuantScheme.a16w8
    keep = set(recipe.keep_layers)
    float_weights = {w.node for w in facts.body_matmuls() if w.layer in keep}
    if facts.lm_head and recipe.lm_head_precision is TensorPrecision.float:
        float_weights.add(facts.lm_head)
    weight_nodes = {w.node for w in facts.weight_matmuls}
    chosen: list[str] = []
    table: dict[str, dict] = {}
    for node in model.graph.node:
        op = node.op_type
        int8_rule, a16_rule, why = OP_POLICY.get(op, ("float", "float", "not in the policy: float"))
        rule = a16_rule if a16 else int8_rule
        if node.name in keep_float:
            decision, reason = "float", keep_float[node.name]
        elif node.name in facts.mask_path:
            decision, reason = "float", MASK_PATH_REASON
        elif node.name in float_weights:
            decision, reason = "float", "kept float by the recipe (lm_head / keep_layers)"
        elif rule == "weights":
            decision = "quantized" if node.name in weight_nodes else "float"
            reason = why
        elif rule in ("all", "quantize"):
            decision, reason = "quantized", why
        else:
            decision, reason = "float", why
        if decision == "quantized":
            chosen.append(node.name)
        row = table.setdefault(op, {"quantized": 0, "float": 0, "reasons": []})
        row[decision] += 1
        if reason and reason not in row["reasons"]:
            row["reasons"].append(reason)
    return chosen, table


def quantize_static_qdq(
    src: Path,
    dst: Path,
    facts: GraphFacts,
    recipe: QuantRecipe,
    reader,
    *,
    keep_float: dict[str, str] | None = None,
    ranges: Path | None = None,
    say: Say = lambda _m: None,
) -> dict:
    """int8-static or a16w8 QDQ quantization of ``src`` into ``dst``; returns the op table.

    ``ranges``: a calibration cache (:func:`save_ranges`) used instead of calibrating on
    ``reader`` (which may then be None). The graph is written by :func:`static_writer`'s
    choice: one calibration segment at a time (qdq_writer.py), or ``quantize_static`` on the
    whole graph; both give the same graph."""
    from onnxruntime.quantization import quantize_static

    model = onnx.load(str(src), load_external_data=False)
    nodes, table = plan_static(model, facts, recipe, keep_float)
    del model
    a16 = recipe.scheme is QuantScheme.a16w8
    op_types = sorted({op for op, row in table.items() if row["quantized"]})
    segments = static_writer(recipe) is QdqWriter.segments
    layered_dir, data = None, None
    if ranges is None and (segments or layered_calibration(recipe)):
        import tempfile

        layered_dir = tempfile.TemporaryDirectory(prefix="slmedge-qdq-")
        if layered_calibration(recipe):
            through = recipe.calibration.prefix is CalibrationPrefix.quantized
            say(f"calibrating {len(op_types)} op types layer by layer on {len(reader)} samples "
                f"(minmax{', through the QDQ prefix' if through else ''}), then QDQ "
                f"{'a16w8' if a16 else 'int8'} of {len(nodes)} nodes")
            data = calibrate_layered(src, reader, recipe, op_types, nodes=nodes, say=say)
        else:  # minmax by ORT's calibrator on the whole graph (QDQ_LAYERED off), then the writer
            say(f"calibrating {len(nodes)} nodes on {len(reader)} samples "
                f"({recipe.calibration.method.value}), then QDQ {'a16w8' if a16 else 'int8'}")
            data = calibrate_ranges(src, reader, recipe, op_types, Path(layered_dir.name))
        ranges = save_ranges(data, Path(layered_dir.name) / "ranges.json")
        reader = None
    elif ranges is None:
        say(f"calibrating {len(nodes)} nodes on {len(reader)} samples "
            f"({recipe.calibration.method.value}), then QDQ {'a16w8' if a16 else 'int8'}")
    else:
        say(f"QDQ {'a16w8' if a16 else 'int8'} of {len(nodes)} nodes with the ranges in {ranges.name}")
    if segments:
        from .qdq_writer import write_qdq_layered

        try:
            if data is None:
                from onnxruntime.quantization.calibrate import load_tensors_data

                data = load_tensors_data(ranges)
            say(f"writing the QDQ graph segment by segment ({len(nodes)} nodes to quantize)")

            def segment(seg_src, seg_dst, names, tensors, seg_ranges, work):
                quantize_segment_file(seg_src, seg_dst, names, tensors, seg_ranges, recipe,
                                      op_types, nodes, work)

            write_qdq_layered(src, dst, data, segment, say=say)
        finally:
            if layered_dir is not None:
                layered_dir.cleanup()
        return table
    cache = {"calibration_cache_path": str(ranges)} if ranges is not None else {}
    converted = opset_for_16_bit(src) if a16 else src
    try:
        quantize_static(str(converted), str(dst), reader, op_types_to_quantize=op_types,
                        nodes_to_quantize=nodes, **_static_options(recipe), **cache)
    finally:
        if layered_dir is not None:
            layered_dir.cleanup()
        if converted != src:
            converted.unlink()
    return table


#: ONNX's first opset with 16-bit QuantizeLinear / DequantizeLinear
OPSET_16_BIT = 21


def opset_for_16_bit(src: Path) -> Path:
    """``src`` itself, or for a graph whose weights are in external data (above 2 GB) and
    whose opset is below 21, a copy converted to opset 21 beside it (reading the same data
    file), to be deleted by the caller.

    ``quantize_static`` with 16-bit activations converts an older graph itself
    (``onnx.version_converter.convert_version`` on the loaded model, weights included), which
    serializes it: above 2 GB that fails (Qwen2.5-0.5B a16w8: ``google.protobuf.message.
    EncodeError: Failed to serialize proto`` after the calibration). The same converter on the
    graph without its weights (external references only) is small. Graphs below 2 GB keep
    ORT's own conversion (their QDQ files stay the bytes they were)."""
    from onnx import version_converter
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(src), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if (opset is None or opset >= OPSET_16_BIT
            or not any(uses_external_data(t) for t in model.graph.initializer)):
        return src
    converted = version_converter.convert_version(model, OPSET_16_BIT)
    out = src.with_name(f"{src.stem}.opset{OPSET_16_BIT}.onnx")
    onnx.save_model(converted, str(out))
    return out


def _static_options(recipe: QuantRecipe) -> dict:
    """``quantize_static``'s arguments for ``recipe`` beyond the graph, the op types / nodes
    and the calibration (the same for the whole graph and a prefix segment)."""
    from onnxruntime.quantization import QuantFormat, QuantType

    a16 = recipe.scheme is QuantScheme.a16w8
    extra = {
        # Weight MatMuls: DQ(act) + DQ(weight) -> MatMul with a float output, which ORT's CPU
        # provider turns into MatMulIntegerToFloat; a Q/DQ on the output would add error only.
        "OpTypesToExcludeOutputQuantization": [] if a16 else ["MatMul"],
        "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
        "MatMulConstBOnly": not a16,
        "ForceQuantizeNoInputCheck": a16,
        # 16-bit Q/DQ needs opset 21, or the com.microsoft Q/DQ ops below it.
        "UseQDQContribOps": a16,
        "ActivationSymmetric": False,
        "WeightSymmetric": True,
        **_calib_extra(recipe),
    }
    return {"quant_format": QuantFormat.QDQ, "per_channel": recipe.per_channel,
            "activation_type": QuantType.QUInt16 if a16 else QuantType.QUInt8,
            "weight_type": QuantType.QInt8,
            "calibrate_method": _calib_method(recipe.calibration.method),
            "extra_options": extra}


#: a node name no graph has (``nodes_to_quantize`` for a segment with nothing to quantize)
NO_NODE = "slmedge:no-node-to-quantize"


def quantize_segment_file(src: Path, dst: Path, names: set[str], tensors: set[str], ranges,
                          recipe: QuantRecipe, op_types: list[str], nodes: list[str],
                          work: Path) -> None:
    """``quantize_static`` of one segment's model file ``src`` into ``dst`` exactly as the
    whole graph is quantized (``recipe``'s options, the same ``op_types``, the chosen
    ``nodes`` among the segment's node ``names``), with the ``ranges`` of the segment's
    ``tensors`` as its calibration cache (written to ``work``, then deleted)."""
    from onnxruntime.quantization import quantize_static
    from onnxruntime.quantization.calibrate import TensorsData

    mine = TensorsData(ranges.calibration_method,
                       {k: v for k, v in ranges.data.items() if k in tensors})
    cache = save_ranges(mine, work / "segment.ranges.json")
    # an empty list would mean "every node" to quantize_static: a segment with none of
    # the chosen nodes (e.g. a float lm_head's) names one that is not there
    quantize_static(str(src), str(dst), None, op_types_to_quantize=op_types,
                    nodes_to_quantize=[n for n in nodes if n in names] or [NO_NODE],
                    calibration_cache_path=str(cache), **_static_options(recipe))
    cache.unlink()


def prefix_quantizer(recipe: QuantRecipe, op_types: list[str], nodes: list[str], work: Path):
    """The ``prefix`` of :func:`.qdq_layered.calibrate_minmax_layered`: one segment (a model,
    serialized) QDQ'd by ``quantize_static`` exactly as the whole graph will be
    (:func:`quantize_segment_file`), with the ranges calibrated so far as its cache; the files
    go to ``work`` and are overwritten per segment."""

    from .qdq_layered import segment_names

    def quantize(segment: bytes, ranges) -> bytes:
        src, dst = work / "segment.onnx", work / "segment.qdq.onnx"
        src.write_bytes(segment)
        names, tensors = segment_names(onnx.load_from_string(segment))
        quantize_segment_file(src, dst, names, tensors, ranges, recipe, op_types, nodes, work)
        out = dst.read_bytes()
        for p in (src, dst):
            p.unlink()
        return out

    return quantize


def static_writer(recipe: QuantRecipe) -> QdqWriter:
    """Who writes ``recipe``'s QDQ graph: its ``calibration.writer``, except that the
    segments' writer needs an onnxruntime whose quantize_static takes precomputed ranges
    (each segment is quantized with its part of them); without one the whole graph is."""
    if recipe.calibration.writer is QdqWriter.segments and not supports_range_cache():
        return QdqWriter.whole
    return recipe.calibration.writer


def layered_calibration(recipe: QuantRecipe) -> bool:
    """Whether ``recipe``'s ranges are calibrated layer by layer (:mod:`.qdq_layered`):
    MinMax, with an onnxruntime whose quantize_static takes precomputed ranges."""
    return (QDQ_LAYERED and recipe.calibration.method is CalibrationMethod.minmax
            and supports_range_cache())


def reader_samples(reader) -> list[dict]:
    """Every sample of a calibration reader, read once; a reader with its own session of the
    whole graph (``KVCacheCalibrationReader``) is closed after, to free it."""
    if hasattr(reader, "samples"):
        samples = list(reader.samples())
    else:
        reader.rewind()
        samples = list(iter(reader.get_next, None))
        reader.rewind()
    if hasattr(reader, "close"):
        reader.close()
    return samples


def calibrate_layered(src: Path, reader, recipe: QuantRecipe, op_types: list[str], *,
                      nodes: list[str] | None = None, say: Say = lambda _m: None):
    """MinMax ranges of ``src``'s ``op_types`` tensors, one decoder layer at a time
    (:func:`.qdq_layered.calibrate_minmax_layered`); the same ``TensorsData`` as
    :func:`calibrate_ranges` with ORT's MinMax calibrator.

    With ``recipe.calibration.prefix`` quantized, each layer's ranges come from the earlier
    layers QDQ'd (:func:`prefix_quantizer`; ``nodes``, the nodes the graph will have
    quantized, is then needed)."""
    import tempfile

    from .qdq_layered import calibrate_minmax_layered

    through = recipe.calibration.prefix is CalibrationPrefix.quantized
    if through and nodes is None:
        raise ValueError("calibration prefix quantized needs the nodes to quantize "
                         "(plan_static's list) to QDQ each segment as the whole graph")
    samples = reader_samples(reader)
    # weights in a .data file are read one segment at a time (a graph above 2 GB has one)
    model = onnx.load(str(src), load_external_data=False)
    work = tempfile.TemporaryDirectory(prefix="slmedge-qdq-prefix-") if through else None
    try:
        prefix = prefix_quantizer(recipe, op_types, nodes, Path(work.name)) if through else None
        return calibrate_minmax_layered(model, samples, op_types, prefix=prefix,
                                        external_dir=str(Path(src).parent), say=say)
    finally:
        del model, samples
        if work is not None:
            work.cleanup()


def supports_range_cache() -> bool:
    """Whether this onnxruntime's ``quantize_static`` takes precomputed ranges
    (``calibration_cache_path``, onnxruntime 1.26+)."""
    import inspect

    from onnxruntime.quantization import calibrate, quantize_static

    return ("calibration_cache_path" in inspect.signature(quantize_static).parameters
            and hasattr(calibrate, "save_tensors_data"))


def calibrate_ranges(src: Path, reader, recipe: QuantRecipe, op_types: list[str], work: Path):
    """ORT's calibrator (the one ``quantize_static`` runs) over ``src``: the range of every
    tensor of the ``op_types`` nodes, as ``onnxruntime.quantization.calibrate.TensorsData``."""
    from onnxruntime.quantization.calibrate import create_calibrator

    # quantize_static's extra-option names -> the calibrator's own
    names = {"CalibTensorRangeSymmetric": "symmetric", "CalibPercentile": "percentile"}
    options = {names[k]: v for k, v in _calib_extra(recipe).items() if k in names}
    calibrator = create_calibrator(
        Path(src), op_types, augmented_model_path=str(work / f"{Path(src).stem}.augmented.onnx"),
        calibrate_method=_calib_method(recipe.calibration.method), extra_options=options)
    calibrator.collect_data(reader)
    data = calibrator.compute_data()
    del calibrator
    return data


def merge_ranges(ranges: dict[str, object], models: dict[str, onnx.ModelProto]) -> tuple[dict, int]:
    """One range per tensor across graphs that compute the same function (a static export's
    prefill and decode graphs): a tensor that is the output of the same node (name and op
    type) in several graphs, or the same graph input, gets the union of its ranges.

    A decode step is one token, so its calibration sees a few tokens' activations where the
    prefill chunks see hundreds: per-graph ranges clipped SmolLM2-135M's decode steps (logit
    cosine 0.93-0.98 vs 0.998 for the same tokens through the prefill graph). Shared ranges
    also give the KV entries one encoding in both graphs."""
    from onnxruntime.quantization.calibrate import TensorData, TensorsData

    def origin(model):
        out = {o: (n.op_type, n.name) for n in model.graph.node for o in n.output}
        out.update({i.name: ("input", i.name) for i in model.graph.input})
        return out

    origins = {k: origin(m) for k, m in models.items()}
    merged, shared = {}, set()
    for kind, data in ranges.items():
        table = {}
        for name, td in data.data.items():
            lo, hi = td.range_value
            for other, odata in ranges.items():
                if other == kind or name not in odata.data:
                    continue
                if origins[kind].get(name) != origins[other].get(name):
                    continue
                olo, ohi = odata.data[name].range_value
                lo, hi = np.minimum(lo, olo), np.maximum(hi, ohi)
                shared.add(name)
            table[name] = TensorData(lowest=np.asarray(lo, np.float32),
                                     highest=np.asarray(hi, np.float32))
        merged[kind] = TensorsData(data.calibration_method, table)
    return merged, len(shared)


def save_ranges(data, path: Path) -> Path:
    from onnxruntime.quantization.calibrate import save_tensors_data

    save_tensors_data(data, path)
    return path


def qdq_summary(model_path: Path) -> dict:
    """Count Q/DQ nodes and which op types consume a dequantized input (for tests/manifest)."""
    model = onnx.load(str(model_path), load_external_data=False)
    producer = {o: n for n in model.graph.node for o in n.output}
    consumed = Counter()
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if any(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear"
               for i in n.input):
            consumed[n.op_type] += 1
    ops = Counter(n.op_type for n in model.graph.node)
    return {"quantize_linear": ops["QuantizeLinear"], "dequantize_linear": ops["DequantizeLinear"],
            "ops_with_dq_inputs": dict(sorted(consumed.items()))}
