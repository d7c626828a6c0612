"""Static QDQ's MinMax calibration one decoder layer at a time, in bounded memory (issue 15).

ONNX Runtime's calibrator (``quantize_static``'s ``MinMaxCalibrater``) loads the whole graph
with inferred shapes, adds a ReduceMin / ReduceMax pair for every tensor of the calibrated op
types, writes that *augmented* graph to disk and opens a session on it: the weights are held
by the loaded proto, the augmented proto and the session at once, beside the calibration
reader's own session of the whole graph (which made the decode samples' caches).

Here the graph is cut into the segments of :mod:`.gptq_layered` (one per decoder layer: the
nodes its weight MatMuls need that no earlier segment ran; then the lm_head; then whatever
is left), and the samples move through them in order::

    samples --> [segment 0] --> frontier --> [segment 1] --> ... --> [rest]
                   | every tensor of the calibrated op types made here: min / max per
                   | sample, the min / max over samples kept (two floats per tensor)

Only one segment's session is alive at a time, and per sample only the *frontier* (what
later segments read: the residual stream, the mask, the rotary tables, cache inputs not
yet read). The activations are the float graph's own, computed by the same kernels with
graph optimizations off as in ORT's augmented session, so the ranges are ORT's: the same
``TensorsData`` (tests compare them and the quantized graphs on tiny models and SmolLM2).
The ranges go to ``quantize_static`` as its calibration cache (``calibration_cache_path``).

With a ``prefix`` quantizer (recipe ``calibration.prefix: quantized``) the samples move
through the *quantized* segments instead: each segment's ranges come from what the earlier
segments, already QDQ'd, hand it, as GPTQ's sequential variant does for weights (issue 15)::

    frontier (through the QDQ prefix) --> [segment s, float] --> ranges of segment s
                     \--> [segment s QDQ'd with those ranges] --> next frontier

The QDQ form of a segment is the quantizer's own (``prefix`` is called with the segment as
a model and the ranges so far), so the prefix carries the fake-quantized weights and
activations the final graph will have; a tensor crossing a segment border gets its Q/DQ
from the segment that makes it (where the whole graph would put it for its consumer, the
same range: the final graph is quantized with the same cache).

MinMax only: the entropy and percentile calibrators build histograms over all samples with
bin edges that grow as data arrives; those still use ORT's whole-graph calibrator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import onnx

from .gptq_layered import Segment, plan_segments, segment_walk

Say = Callable[[str], None]


def calibration_segments(model: onnx.ModelProto) -> list[Segment]:
    """Every node of ``model`` in a segment: :func:`.gptq_layered.plan_segments` on the weight
    MatMuls (MatMul with a constant second input), then one segment of the nodes left (those
    no weight MatMul needs, e.g. the last layer's cache outputs), frontiers recomputed."""
    graph = model.graph
    nodes = list(graph.node)
    consts = {t.name for t in graph.initializer}
    targets = [n.name for n in nodes if n.op_type == "MatMul" and len(n.input) > 1
               and n.input[1] in consts]
    if len(set(targets)) != len(targets) or any(not t for t in targets):
        raise ValueError("layered calibration needs unique, non-empty node names; this graph "
                         "has weight MatMuls without them")
    segments = plan_segments(model, targets) if targets else []
    taken = {i for seg in segments for i in seg.nodes}
    rest = [i for i in range(len(nodes)) if i not in taken]
    if rest:
        made = {o for i in rest for o in nodes[i].output if o}
        reads = list(dict.fromkeys(t for i in rest for t in nodes[i].input
                                   if t and t not in made))
        segments.append(Segment(None, rest, [], reads, []))
    made_in = {o: s for s, seg in enumerate(segments) for i in seg.nodes
               for o in nodes[i].output if o}
    for seg in segments:
        seg.frontier = []
    for s, seg in enumerate(segments):
        for t in seg.reads:
            owner = made_in.get(t)
            if owner is not None and owner != s and t not in segments[owner].frontier:
                segments[owner].frontier.append(t)
    return segments


def tensors_to_calibrate(model: onnx.ModelProto, op_types: Sequence[str] | None) -> set[str]:
    """The non-constant inputs and outputs of the nodes of ``op_types`` (all nodes when
    None), as ORT's ``CalibraterBase.select_tensors_to_calibrate`` picks them. Its further
    filters (a float type in the inferred value_info) are applied at run time: a tensor whose
    array is not float gets no range. A range for a tensor the quantizer cannot see typed is
    never read (it quantizes only tensors typed float in the same inferred value_info)."""
    inits = {t.name for t in model.graph.initializer}
    picked = set()
    for node in model.graph.node:
        if not op_types or node.op_type in op_types:
            picked.update(t for t in [*node.input, *node.output] if t and t not in inits)
    return picked


def _loaded(tensor: onnx.TensorProto, external_dir: str | None) -> onnx.TensorProto:
    """``tensor`` with its bytes: a copy read from its external file when it has one."""
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    if external_dir is None or not uses_external_data(tensor):
        return tensor
    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    load_external_data_for_tensor(copy, external_dir)
    del copy.external_data[:]
    copy.data_location = onnx.TensorProto.DEFAULT
    return copy


#: ``prefix(segment_model_bytes, ranges_so_far) -> the same segment QDQ'd`` (serialized)
PrefixQuantizer = Callable[[bytes, object], bytes]


def _segment_bytes(model: onnx.ModelProto, seg: Segment, inits: dict, types: dict[str, int],
                   outputs: list[str], external_dir: str | None = None) -> bytes:
    return segment_model(model, seg, inits, types, outputs, external_dir).SerializeToString()


def segment_model(model: onnx.ModelProto, seg: Segment, inits: dict, types: dict[str, int],
                  outputs: list[str], external_dir: str | None = None,
                  typed: dict[str, onnx.ValueInfoProto] | None = None) -> onnx.ModelProto:
    """``seg`` as a model of its own (its reads as inputs, ``outputs`` as outputs, its
    initializers' bytes read from ``external_dir``). ``typed``: the whole graph's inferred
    value infos, given to the segment's inputs, outputs and inner tensors (the QDQ writer:
    ORT's quantizer quantizes only tensors it sees typed float, and ONNX's shape inference,
    which it runs on the segment, types nothing past an op it does not know, e.g. the fused
    norms' SimplifiedLayerNormalization: the whole graph carries those types from the
    export); else inputs carry ``types``' element type and outputs no type."""
    graph = model.graph
    typed = typed or {}
    feeds = [typed[t] if t in typed else onnx.helper.make_tensor_value_info(t, types[t], None)
             for t in seg.reads if t not in inits]
    nodes = [graph.node[i] for i in seg.nodes]
    ends = set(outputs)
    inner = [typed[t] for t in dict.fromkeys(o for n in nodes for o in n.output)
             if t in typed and t not in ends]
    sub = onnx.helper.make_graph(
        nodes, f"calibration_segment_{seg.layer}", feeds,
        [typed.get(t) or onnx.ValueInfoProto(name=t) for t in outputs],
        initializer=[_loaded(inits[t], external_dir) for t in seg.reads if t in inits],
        value_info=inner)
    out = onnx.helper.make_model(sub, opset_imports=list(model.opset_import),
                                 ir_version=model.ir_version)
    out.functions.extend(model.functions)
    return out


def segment_names(model: onnx.ModelProto) -> tuple[set[str], set[str]]:
    """A segment model's node names and the tensors its nodes read or write."""
    names = {n.name for n in model.graph.node}
    return names, {t for n in model.graph.node for t in [*n.input, *n.output]}


class _MinMax:
    """Running min / max per tensor over samples, as ORT's MinMaxCalibrater computes them
    (per sample ReduceMin / ReduceMax over the whole tensor, then nanmin / nanmax over
    samples; an empty tensor contributes nothing)."""

    def __init__(self):
        self.low: dict[str, np.ndarray] = {}
        self.high: dict[str, np.ndarray] = {}
        self.order: list[str] = []

    def add(self, name: str, value: np.ndarray) -> None:
        if value.dtype not in (np.float32, np.float16) or value.size == 0:
            return
        lo, hi = value.min(keepdims=False), value.max(keepdims=False)
        if name not in self.low:
            self.order.append(name)
            self.low[name], self.high[name] = lo, hi
        else:
            self.low[name] = np.fmin(self.low[name], lo)
            self.high[name] = np.fmax(self.high[name], hi)

    def tensors_data(self, symmetric: bool = False):
        from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData

        data = {}
        for name in self.order:
            lo, hi = np.asarray([self.low[name]]), np.asarray([self.high[name]])
            if symmetric:
                m = np.fmax(np.abs(lo), np.abs(hi))
                lo, hi = -m, m
            data[name] = TensorData(lowest=lo, highest=hi)
        return TensorsData(CalibrationMethod.MinMax, data)


def _run_segment(model, seg: Segment, inits: dict, types: dict[str, int], outputs: list[str],
                 external_dir: str | None, opts, state: list[dict], stats: _MinMax,
                 wanted: set[str], keep: set[str], body: bytes | None = None) -> None:
    """Run one segment (``body``, else its float form from ``model``) on every sample:
    the ``wanted`` outputs' ranges into ``stats``, the ``keep`` ones into the sample."""
    import onnxruntime as ort

    if not outputs:
        return
    if body is None:
        body = _segment_bytes(model, seg, inits, types, outputs, external_dir)
    session = ort.InferenceSession(body, opts, providers=["CPUExecutionProvider"])
    del body
    feeds_of = [t for t in seg.reads if t not in inits]
    for sample in state:
        values = session.run(outputs, {t: sample[t] for t in feeds_of})
        for name, value in zip(outputs, values, strict=True):
            if name in wanted:
                stats.add(name, value)
            if name in keep:
                sample[name] = value
        del values


def calibrate_minmax_layered(
    model: onnx.ModelProto,
    samples: Iterable[dict],
    op_types: Sequence[str] | None,
    *,
    symmetric: bool = False,
    threads: int | None = None,
    external_dir: str | None = None,
    prefix: PrefixQuantizer | None = None,
    say: Say = lambda _m: None,
):
    """MinMax ranges (``onnxruntime.quantization.calibrate.TensorsData``) of every tensor of
    the ``op_types`` nodes of the float graph ``model``, one segment at a time (module
    docstring). ``samples`` are feeds of the whole graph, read once. ``model`` is not
    changed. Weights in external data are read from ``external_dir`` one segment at a time
    (load ``model`` with ``load_external_data=False``: only one segment's weights are then
    in memory).

    ``prefix``: each segment's frontier is computed by the segment as ``prefix`` quantizes
    it with the ranges so far (module docstring), not by the float segment."""
    import onnxruntime as ort

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    wanted = tensors_to_calibrate(model, op_types)
    segments = calibration_segments(model)
    state, types, last_read = segment_walk(graph, samples, segments)
    stats = _MinMax()
    for i in graph.input:  # graph inputs: their ranges straight from the feeds
        if i.name in wanted:
            for sample in state:
                if i.name in sample:
                    stats.add(i.name, np.asarray(sample[i.name]))
    opts = ort.SessionOptions()
    # as ORT's calibrator runs the augmented graph: no fusion, the same kernels as unfused
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    for s, seg in enumerate(segments):
        for t in seg.reads:
            if t not in types and t not in inits:
                types[t] = onnx.helper.np_dtype_to_tensor_dtype(state[0][t].dtype)
        made = [o for i in seg.nodes for o in graph.node[i].output if o]
        calibrated = [t for t in made if t in wanted]
        if prefix is None:
            outputs = list(dict.fromkeys(calibrated + seg.frontier))
            _run_segment(model, seg, inits, types, outputs, external_dir, opts, state,
                         stats, wanted, set(seg.frontier))
        else:
            _run_segment(model, seg, inits, types, calibrated, external_dir, opts, state,
                         stats, wanted, set())
            if seg.frontier:  # what later segments read, through this segment's QDQ form
                quantized = prefix(_segment_bytes(model, seg, inits, types, seg.frontier,
                                                  external_dir), stats.tensors_data(symmetric))
                _run_segment(None, seg, inits, types, seg.frontier, None, opts, state,
                             stats, set(), set(seg.frontier), body=quantized)
        for sample in state:  # nothing later reads these
            for t in [t for t in sample if last_read.get(t, -1) <= s]:
                del sample[t]
        say(f"calibration: segment {s + 1}/{len(segments)} "
            f"(layer {seg.layer if seg.layer is not None else '-'}, {len(calibrated)} tensors)")
    return stats.tensors_data(symmetric)
