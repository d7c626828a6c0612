"""gptq-act one decoder layer at a time, through the already-quantized prefix (issue 15).

:func:`gptq.collect_hessians` runs the whole float graph once and keeps every input's
``K x K`` Hessian (float64) until all weights are quantized: for a 1B model with an
8192-wide MLP that is ~10 GB. Here the graph is cut into *segments*, one per decoder
layer (the ancestors of that layer's weight MatMuls not in an earlier segment), and the
calibration samples move through them in order::

    samples --> [segment 0] --> frontier 0 --> [segment 1] --> ... --> [lm_head segment]
                 |  run 1, float weights: the layer's MatMul inputs -> its Hessians
                 |  GPTQ each weight; free the Hessians
                 |  run 2, the layer's quantized weights: the tensors later segments read
                 v
    The *frontier* after a segment is what later segments read of it (the residual
    stream, the attention's sequence lengths, ...), kept per sample; graph inputs (ids,
    past KV) are dropped once their last reader has run.

So each layer's Hessians are built from the activations the quantized model itself
feeds that layer (GPTQ's sequential variant, Frantar et al. 2022, sec. 4), and at most one
layer's Hessians are alive at a time. Memory: one layer's Hessians + the frontier of
every calibration sample (SmolLM2, 64 x 128 tokens: ~40 MB) + one segment's session.

Each segment runs as its own ONNX Runtime session built from the graph's nodes, with the
layer's weights as graph inputs (so the float and the quantized run share one session).
Layer numbers come from the exporter's name scopes (graph.py); a weight MatMul without
one is a segment of its own, in graph order (the ``lm_head``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx

from .gptq import dequantize, gptq_quantize
from .graph import _module_and_layer

Say = Callable[[str], None]
#: ``(j, scale, zero)`` of :func:`gptq.gptq_quantize`
Quantized = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass
class Segment:
    """The nodes that run for one layer's weight MatMuls, and what crosses its borders."""

    layer: int | None
    nodes: list[int]  # indices into graph.node, in graph order
    targets: list[int]  # the weight MatMuls quantized in this segment (indices)
    reads: list[str]  # tensors from outside the segment (graph inputs, earlier frontier)
    activations: list[str]  # the targets' inputs (one Hessian each)
    frontier: list[str] = field(default_factory=list)  # produced here, read by later segments


@dataclass
class LayerRecord:
    """What one segment held: Hessians (count and float64 bytes) and weights quantized."""

    layer: int | None
    hessians: int
    hessian_bytes: int
    weights: int


@dataclass
class LayeredResult:
    """:func:`gptq_layered`'s output: per MatMul output name, GPTQ's ``(j, scale, zero)``."""

    quantized: dict[str, Quantized]
    layers: list[LayerRecord]

    @property
    def peak_hessian_bytes(self) -> int:
        """The most Hessian memory alive at once: one segment's (they are freed between)."""
        return max((r.hessian_bytes for r in self.layers), default=0)


def plan_segments(model: onnx.ModelProto, targets: Iterable[str]) -> list[Segment]:
    """Cut ``model``'s graph into one segment per decoder layer of the ``targets`` (weight
    MatMul node names), in the order the graph computes them."""
    graph = model.graph
    nodes = list(graph.node)
    index = {n.name: i for i, n in enumerate(nodes)}
    wanted = list(targets)
    missing = sorted(set(wanted) - set(index))
    if missing:
        raise ValueError(f"no node named {missing[:3]} in the graph (gptq-act targets)")
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    groups: dict[object, list[int]] = {}
    for name in sorted(wanted, key=index.__getitem__):
        layer = _module_and_layer(nodes[index[name]])[1]
        key = layer if layer is not None else ("node", name)
        groups.setdefault(key, []).append(index[name])
    order = sorted(groups.values(), key=min)
    taken: set[int] = set()
    segments = []
    for members in order:
        mine: set[int] = set()
        stack = list(members)
        while stack:
            i = stack.pop()
            if i in taken or i in mine:
                continue
            mine.add(i)
            stack.extend(producer[t] for t in nodes[i].input if t in producer)
        taken |= mine
        ordered = sorted(mine)
        made = {o for i in ordered for o in nodes[i].output if o}
        reads = list(dict.fromkeys(t for i in ordered for t in nodes[i].input
                                   if t and t not in made))
        layer = _module_and_layer(nodes[members[0]])[1]
        segments.append(Segment(layer, ordered, members, reads,
                                list(dict.fromkeys(nodes[i].input[0] for i in members))))
    # what each segment hands on: its tensors that a later segment reads
    made_in = {o: s for s, seg in enumerate(segments) for i in seg.nodes
               for o in nodes[i].output if o}
    for s, seg in enumerate(segments):
        for t in seg.reads:
            if t in made_in and made_in[t] != s and t not in segments[made_in[t]].frontier:
                segments[made_in[t]].frontier.append(t)
    return segments


def segment_walk(graph: onnx.GraphProto, samples: Iterable[dict], segments: list[Segment]):
    """What a walk over ``segments`` starts from: the samples' feeds as the running state
    (one dict per sample), the graph inputs' element types, and for each tensor the last
    segment that reads it (it is dropped from the state after that one)."""
    state = [dict(feed) for feed in samples]
    if not state:
        raise ValueError("the calibration reader gave no samples")
    types = {i.name: i.type.tensor_type.elem_type for i in graph.input}
    last_read: dict[str, int] = {}
    for s, seg in enumerate(segments):
        for t in seg.reads:
            last_read[t] = s
    return state, types, last_read


def _segment_model(model: onnx.ModelProto, seg: Segment, inits: dict[str, onnx.TensorProto],
                   types: dict[str, int], weights: list[str]) -> bytes:
    """One segment as a serialized model: its nodes, the initializers they read except
    ``weights`` (graph inputs instead), ``seg.reads`` as inputs, activations + frontier
    out (untyped outputs: ONNX Runtime infers them)."""
    graph = model.graph
    nodes = [graph.node[i] for i in seg.nodes]
    feeds = [onnx.helper.make_tensor_value_info(t, types[t], None)
             for t in seg.reads if t not in inits or t in weights]
    outputs = [onnx.ValueInfoProto(name=t) for t in dict.fromkeys(seg.activations + seg.frontier)]
    used = [inits[t] for t in seg.reads if t in inits and t not in weights]
    sub = onnx.helper.make_graph(nodes, f"segment_{seg.layer}", feeds, outputs, initializer=used)
    out = onnx.helper.make_model(sub, opset_imports=list(model.opset_import),
                                 ir_version=model.ir_version)
    return out.SerializeToString()


#: float64 working copies of one weight's columns at a time (GPTQ's output columns are
#: independent): Qwen2.5-0.5B's lm_head (896 x 151936) would take 3 x 1.1 GB at once
COLUMN_BUDGET_BYTES = 256 << 20


def _gptq_by_columns(w: np.ndarray, hessian: np.ndarray, block: int,
                     budget: int = COLUMN_BUDGET_BYTES) -> Quantized:
    """:func:`gptq.gptq_quantize` of ``w`` (``[K, N]``) in slices of columns that keep its
    float64 copies within ``budget`` (the same result: each column is rounded alone)."""
    k, n = w.shape
    step = max(1, budget // (k * 8 * 3))
    if step >= n:
        return gptq_quantize(np.asarray(w, dtype=np.float64), hessian, block)
    parts = [gptq_quantize(np.asarray(w[:, c:c + step], dtype=np.float64), hessian, block)
             for c in range(0, n, step)]
    return tuple(np.concatenate(p, axis=1) for p in zip(*parts, strict=True))


def gptq_layered(
    model: onnx.ModelProto,
    targets: dict[str, int],
    samples: Iterable[dict],
    *,
    say: Say = lambda _m: None,
    threads: int | None = None,
    on_hessians: Callable[[int | None, dict[str, np.ndarray]], None] | None = None,
) -> LayeredResult:
    """GPTQ (activation order, :func:`gptq.gptq_quantize`) of every weight MatMul named in
    ``targets`` (node name -> block size) of the float graph ``model``, one layer at a time,
    each layer's Hessians from the activations of the quantized layers before it.

    ``samples`` are input feeds of the whole graph (read once, kept as frontier values).
    ``on_hessians(layer, {activation: H})`` sees each segment's Hessians before they are
    freed (tests). ``model`` is not changed.
    """
    import onnxruntime as ort
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes = list(graph.node)
    for name, i in ((n, j) for j, n in enumerate(x.name for x in nodes)):
        if name in targets and (nodes[i].op_type != "MatMul" or nodes[i].input[1] not in inits):
            raise ValueError(f"{name}: gptq-act quantizes MatMuls with a constant weight, "
                             f"not {nodes[i].op_type}")
    segments = plan_segments(model, targets)
    state, types, last_read = segment_walk(graph, samples, segments)
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    quantized: dict[str, Quantized] = {}
    records = []
    for s, seg in enumerate(segments):
        for t in seg.reads:
            if t not in types and t not in inits:
                types[t] = onnx.helper.np_dtype_to_tensor_dtype(state[0][t].dtype)
        mats = [nodes[i] for i in seg.targets]
        weights = [m.input[1] for m in mats]
        for w in weights:
            types[w] = inits[w].data_type
        session = ort.InferenceSession(_segment_model(model, seg, inits, types, weights), opts,
                                       providers=["CPUExecutionProvider"])
        floats = {w: numpy_helper.to_array(inits[w]) for w in weights}
        dims = {a: int(floats[m.input[1]].shape[0]) for m in mats for a in [m.input[0]]}
        feeds_of = [t for t in seg.reads if t not in inits or t in weights]
        acc = {a: np.zeros((k, k)) for a, k in dims.items()}
        rows = dict.fromkeys(dims, 0)
        for sample in state:
            feed = {t: sample[t] for t in feeds_of if t not in floats} | floats
            for a, x in zip(seg.activations, session.run(seg.activations, feed), strict=True):
                # one sample's rows (<= a prompt chunk) summed in float32, the total in
                # float64: half the time of a float64 product, ~1e-6 relative error
                x = x.reshape(-1, dims[a]).astype(np.float32)
                acc[a] += x.T @ x
                rows[a] += x.shape[0]
        hessians = {a: acc[a] / max(rows[a], 1) for a in acc}
        del acc
        if on_hessians is not None:
            on_hessians(seg.layer, hessians)
        records.append(LayerRecord(seg.layer, len(hessians),
                                   sum(h.nbytes for h in hessians.values()), len(mats)))
        dequant = {}
        for m in mats:
            q = _gptq_by_columns(floats[m.input[1]], hessians[m.input[0]], targets[m.name])
            quantized[m.output[0]] = q
            dequant[m.input[1]] = dequantize(*q, targets[m.name]).astype(floats[m.input[1]].dtype)
        del hessians
        if seg.frontier:  # the next segments read what the quantized layer produces
            for sample in state:
                feed = {t: sample[t] for t in feeds_of if t not in floats} | dequant
                sample.update(zip(seg.frontier, session.run(seg.frontier, feed), strict=True))
        for sample in state:  # nothing later reads these
            for t in [t for t in sample if last_read.get(t, -1) <= s]:
                del sample[t]
        del session, floats, dequant
        say(f"gptq-act: layer {seg.layer if seg.layer is not None else '(no layer)'} "
            f"({s + 1}/{len(segments)} segments, {len(mats)} MatMuls)")
    return LayeredResult(quantized, records)
