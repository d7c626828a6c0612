"""Static QDQ written one calibration segment at a time, without ORT's whole-graph pass (issue 15).

``quantize_static`` on the whole graph holds the loaded graph, its shape-inferred copy, the
quantizer's working model and the serialized output at once: Qwen2.5-0.5B-shaped int8-static
peaked at 8.5 GB there (~4x the fp32 file). Here the graph is cut into the calibration
segments of :mod:`.qdq_layered` (one per decoder layer, then the lm_head, then the rest),
each segment (its own weights read from the external-data file) is QDQ'd by
``quantize_static`` itself with the same options, op types, chosen nodes and ranges
(:func:`.qdq.prefix_quantizer`), and the segments' QDQ graphs are joined::

    [segment 0] -quantize_static-> nodes + initializers --+
    [segment 1] -quantize_static-> nodes + initializers --+--> one graph (initializers
    ...                                                     |    written as they come)
    [rest]      -quantize_static-> nodes + initializers --+

ORT's quantizer (``QDQQuantizer``, ``DedicatedQDQPair`` off) gives a quantized activation
``T`` one Q/DQ pair named after it (``T_QuantizeLinear`` -> ``T_DequantizeLinear``), and
every other node reading ``T`` reads ``T_DequantizeLinear_Output`` instead; a graph output
keeps its name on the DQ side (the producer writes ``T_QuantizeLinear_Input``). A tensor
crossing a segment border is an output of one segment and an input of the next, so each may
have made the pair (the same names, the same scale: one range per tensor); the join keeps
one, brings every pair to the whole graph's form (the graph-output form only for the model's
own outputs) and points every reader of ``T`` in every segment at the DQ output. Scale and
zero-point initializers are named after their tensor too (``T_scale``), so a tensor quantized
in two segments has the same initializers there: they are written once (a name written twice
with other bytes is an error, never a silent pick). The nodes are then sorted in dependency
order (ORT sorts its output too; the order may differ, the graph does not).
"""

from __future__ import annotations

import heapq
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from .external_data import encode_varint

Say = Callable[[str], None]

Q_SUFFIX, DQ_SUFFIX = "_QuantizeLinear", "_DequantizeLinear"
#: the largest output kept in one file (protobuf's 2 GB limit, with room for the graph)
INLINE_LIMIT = 1_800_000_000


def _q_out(t: str) -> str:
    return f"{t}{Q_SUFFIX}_Output"


def _dq_out(t: str) -> str:
    return f"{t}{DQ_SUFFIX}_Output"


def _q_in(t: str) -> str:
    return f"{t}{Q_SUFFIX}_Input"


def _pair_tensor(node: onnx.NodeProto) -> str | None:
    """The activation ``node`` (a QuantizeLinear of ORT's QDQ pass) quantizes, else None."""
    if node.op_type != "QuantizeLinear" or not node.name.endswith(Q_SUFFIX):
        return None
    t = node.name[: -len(Q_SUFFIX)]
    return t if node.input[0] in (t, _q_in(t)) and node.output[0] == _q_out(t) else None


def _rename(node: onnx.NodeProto, inputs: dict[str, str], outputs: dict[str, str]) -> None:
    for j, name in enumerate(node.input):
        node.input[j] = inputs.get(name, name)
    for j, name in enumerate(node.output):
        node.output[j] = outputs.get(name, name)


def neutral_form(nodes: list[onnx.NodeProto]) -> set[str]:
    """Bring the Q/DQ pairs ORT gave a segment's outputs (graph-output form) to the form of
    an inner tensor (producer -> ``T`` -> Q -> DQ -> ``T_DequantizeLinear_Output``), in place;
    returns the tensors with a pair."""
    pairs = {t: n for n in nodes if (t := _pair_tensor(n)) is not None}
    as_output = {t for t, n in pairs.items() if n.input[0] == _q_in(t)}
    made = {_q_in(t): t for t in as_output}
    reads = {t: _dq_out(t) for t in as_output}
    for node in nodes:
        if node.op_type == "QuantizeLinear" and _pair_tensor(node) in as_output:
            node.input[0] = _pair_tensor(node)
        elif node.op_type == "DequantizeLinear" and node.name[: -len(DQ_SUFFIX)] in as_output \
                and node.name.endswith(DQ_SUFFIX):
            node.output[0] = _dq_out(node.name[: -len(DQ_SUFFIX)])
        else:
            _rename(node, reads, made)
    return set(pairs)


def _take_pairs(nodes: list[onnx.NodeProto], versions: dict[str, list]) -> list[onnx.NodeProto]:
    """The activation Q/DQ pairs of ``nodes`` (neutral form) into ``versions`` (tensor ->
    [(Q, DQ), ...], one per segment that made it); returns the other nodes."""
    q_of = {t: n for n in nodes if (t := _pair_tensor(n)) is not None}
    dq_of = {n.name[: -len(DQ_SUFFIX)]: n for n in nodes if n.op_type == "DequantizeLinear"
             and n.name.endswith(DQ_SUFFIX) and n.input[0] == _q_out(n.name[: -len(DQ_SUFFIX)])}
    for t, q in q_of.items():
        versions.setdefault(t, []).append((q, dq_of[t]))
    taken = {id(q) for q in q_of.values()} | {id(dq_of[t]) for t in q_of}
    return [n for n in nodes if id(n) not in taken]


def choose_pairs(versions: dict[str, list]) -> dict[str, tuple[onnx.NodeProto, onnx.NodeProto]]:
    """One Q/DQ pair per tensor, with the whole graph's scale. A tensor whose producer hands
    it its input's scale (ORT's ``quantize_output_same_as_input``: Reshape, Transpose, ...)
    uses that scale even where another segment, reading it as an input, gave it its own (in
    ORT's quantizer the shared marking wins); a chain of such shares across segments ends at
    its first tensor's scale, as ``_quantize_sharing_param_tensors`` resolves it."""
    chosen = {}
    for t, pairs in versions.items():
        shared = {q.input[1]: (q, dq) for q, dq in pairs if q.input[1] != f"{t}_scale"}
        if len(shared) > 1:
            raise ValueError(f"tensor {t!r} shares the scale of different tensors in two "
                             f"segments ({sorted(shared)}): a bug in the segment join")
        chosen[t] = next(iter(shared.values())) if shared else pairs[0]

    def root(t: str, depth: int = 0) -> tuple[str, str]:
        q = chosen[t][0]
        scale, zp = q.input[1], q.input[2]
        provider = scale[: -len("_scale")] if scale.endswith("_scale") else None
        if provider is None or provider == t or provider not in chosen or depth > len(chosen):
            return scale, zp
        return root(provider, depth + 1)

    for t, (q, dq) in chosen.items():
        scale, zp = root(t)
        for node in (q, dq):
            node.input[1], node.input[2] = scale, zp
    return chosen


def whole_graph_form(nodes: list[onnx.NodeProto], pairs: set[str], graph_outputs: set[str]) -> None:
    """Every reader of a quantized ``T`` reads its DQ output, as ``replace_input_of_all_nodes``
    makes it in the whole graph; a model output keeps its name on the DQ side."""
    reads = {t: _dq_out(t) for t in pairs}
    for node in nodes:
        if _pair_tensor(node) is None:
            _rename(node, reads, {})
    for t in pairs & graph_outputs:
        for node in nodes:
            if _pair_tensor(node) == t:
                node.input[0] = _q_in(t)
            elif node.op_type == "DequantizeLinear" and node.name == t + DQ_SUFFIX:
                node.output[0] = t
            else:
                _rename(node, {_dq_out(t): t}, {t: _q_in(t)})


def topological(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` in dependency order, keeping the given order where free (Kahn, by index)."""
    maker = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    waits = [0] * len(nodes)
    readers: dict[int, list[int]] = {}
    for i, n in enumerate(nodes):
        deps = {maker[t] for t in n.input if t and t in maker and t not in available}
        waits[i] = len(deps)
        for d in deps:
            readers.setdefault(d, []).append(i)
    ready = [i for i, w in enumerate(waits) if w == 0]
    heapq.heapify(ready)
    out = []
    while ready:
        i = heapq.heappop(ready)
        out.append(nodes[i])
        for r in readers.get(i, []):
            waits[r] -= 1
            if waits[r] == 0:
                heapq.heappush(ready, r)
    if len(out) != len(nodes):
        raise ValueError(f"the joined QDQ graph has a cycle: {len(nodes) - len(out)} nodes "
                         "never get their inputs (a bug in the segment join)")
    return out


class _Initializers:
    """The joined graph's initializers, each written once, the large ones appended to an
    external-data file as they come (so one segment's weights are in memory at a time)."""

    def __init__(self, data_path: Path, threshold: int = 1024):
        self.path, self.threshold = data_path, threshold
        self.tensors: list[onnx.TensorProto] = []
        self.digest: dict[str, bytes] = {}
        self.offset = 0
        self.file = open(data_path, "wb")  # noqa: SIM115 (closed in close())

    def add(self, tensor: onnx.TensorProto) -> None:
        import hashlib

        key = hashlib.sha256(tensor.SerializeToString()).digest()
        if tensor.name in self.digest:
            if self.digest[tensor.name] != key:
                raise ValueError(f"initializer {tensor.name!r} was quantized differently in two "
                                 "segments (a weight shared across layers with other quantization "
                                 "parameters per reader); quantize this graph with the whole-graph "
                                 "quantizer (calibration writer whole, --calib-writer whole)")
            return
        self.digest[tensor.name] = key
        if len(tensor.raw_data) < self.threshold:
            self.tensors.append(tensor)
            return
        from onnx.external_data_helper import set_external_data

        raw = tensor.raw_data
        self.file.write(raw)
        set_external_data(tensor, self.path.name, offset=self.offset, length=len(raw))
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        self.offset += len(raw)
        self.tensors.append(tensor)

    def close(self) -> int:
        self.file.close()
        return self.offset


def _typed_values(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """The whole graph's inferred value infos, inferred on a copy without the weights' bytes
    (shape inference reads an initializer's type and dims only; a graph stored inline would
    otherwise be copied twice), copied out so the inferred proto is freed."""
    graph = model.graph
    # small constants (shapes, axes) keep their values: shape inference folds them
    stubs = [t if t.ByteSize() < 4096 else
             onnx.TensorProto(name=t.name, data_type=t.data_type, dims=list(t.dims))
             for t in graph.initializer]
    bare = onnx.helper.make_model(
        onnx.helper.make_graph(list(graph.node), graph.name, list(graph.input),
                               list(graph.output), initializer=stubs,
                               value_info=list(graph.value_info)),
        opset_imports=list(model.opset_import), ir_version=model.ir_version)
    bare.functions.extend(model.functions)
    g = onnx.shape_inference.infer_shapes(bare).graph
    out = {}
    for v in [*g.value_info, *g.output, *g.input]:
        if v.type.HasField("tensor_type"):
            out[v.name] = onnx.ValueInfoProto()
            out[v.name].CopyFrom(v)
    return out


#: ``quantize_segment(src, dst, names, tensors, ranges, work)``: one segment's model file QDQ'd
#: as the whole graph would be (qdq.quantize_segment_file with the recipe's options bound)
SegmentQuantizer = Callable[[Path, Path, set, set, object, Path], None]


def write_qdq_layered(src: Path, dst: Path, ranges, quantize_segment: SegmentQuantizer, *,
                      say: Say = lambda _m: None) -> dict:
    """``quantize_static``'s QDQ graph of ``src`` into ``dst``, one segment at a time (module
    docstring); ``ranges``: the calibration's ``TensorsData``. Returns counts for the log."""
    from .qdq_layered import calibration_segments, segment_model, segment_names

    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    typed = _typed_values(model)
    inits = {t.name: t for t in graph.initializer}
    outputs = [o.name for o in graph.output]
    segments = calibration_segments(model)
    dst = Path(dst)
    store = _Initializers(dst.with_name(dst.name + ".data"))
    joined: list[onnx.NodeProto] = []
    seen: dict[str, bytes] = {}
    versions: dict[str, list[tuple[onnx.NodeProto, onnx.NodeProto]]] = {}
    header = None
    with tempfile.TemporaryDirectory(prefix="slmedge-qdq-writer-") as work:
        seg_src, seg_dst = Path(work) / "segment.onnx", Path(work) / "segment.qdq.onnx"
        try:
            for s, seg in enumerate(segments):
                made = {o for i in seg.nodes for o in graph.node[i].output if o}
                outs = list(dict.fromkeys([*seg.frontier, *(o for o in outputs if o in made)]))
                body = segment_model(model, seg, inits, {}, outs, str(Path(src).parent), typed)
                names, tensors = segment_names(body)
                onnx.save_model(body, str(seg_src))
                del body
                quantize_segment(seg_src, seg_dst, names, tensors, ranges, Path(work))
                part = onnx.load(str(seg_dst))
                if header is None:
                    header = (list(part.opset_import), part.ir_version, part.producer_name,
                              part.producer_version)
                seg_nodes = list(part.graph.node)
                neutral_form(seg_nodes)
                for node in _take_pairs(seg_nodes, versions):
                    blob = node.SerializeToString()
                    if node.name in seen:
                        if seen[node.name] != blob:
                            raise ValueError(f"node {node.name!r} differs between two segments' "
                                             "QDQ graphs (a bug in the segment join)")
                        continue
                    seen[node.name] = blob
                    joined.append(node)
                for t in part.graph.initializer:
                    store.add(t)
                del part
                say(f"QDQ writer: segment {s + 1}/{len(segments)} "
                    f"(layer {seg.layer if seg.layer is not None else '-'}, {len(seg_nodes)} nodes)")
        finally:
            written = store.close()
    pairs = choose_pairs(versions)
    joined += [n for q, dq in pairs.values() for n in (q, dq)]
    whole_graph_form(joined, set(pairs), set(outputs))
    read = {t for n in joined for t in n.input}
    tensors = [t for t in store.tensors if t.name in read]  # as ORT's clean_initializers
    available = {i.name for i in graph.input} | {t.name for t in tensors}
    out = onnx.helper.make_model(
        onnx.helper.make_graph(topological(joined, available), graph.name, list(graph.input),
                               list(graph.output), initializer=tensors),
        opset_imports=header[0], ir_version=header[1])
    out.producer_name, out.producer_version = header[2], header[3]
    out.metadata_props.extend(model.metadata_props)
    out.functions.extend(model.functions)
    if written <= INLINE_LIMIT:  # one file, as quantize_static writes below 2 GB
        save_inline_streamed(out, dst, store.path)
        store.path.unlink()
    else:
        onnx.save_model(out, str(dst))
    return {"segments": len(segments), "nodes": len(joined), "pairs": len(pairs),
            "external_bytes": written if written > INLINE_LIMIT else 0}


#: protobuf keys (field number << 3 | length-delimited): ModelProto.graph, GraphProto.initializer
_GRAPH_KEY, _INITIALIZER_KEY = bytes([7 << 3 | 2]), bytes([5 << 3 | 2])


def save_inline_streamed(model: onnx.ModelProto, dst: Path, data: Path) -> None:
    """``model`` (its large initializers in ``data``, external references) saved as one file
    with every initializer inline, one tensor in memory at a time: the graph's bytes without
    initializers, then each initializer as a further ``initializer`` field (protobuf merges
    repeated fields wherever they occur, so the file loads as ``onnx.save_model``'s would).
    Loading them all into the proto and serializing it held the output twice."""
    from onnx.external_data_helper import uses_external_data

    tensors = list(model.graph.initializer)
    del model.graph.initializer[:]
    graph = model.graph.SerializeToString()
    model.ClearField("graph")
    head = model.SerializeToString()

    def inline(t: onnx.TensorProto, raw: bytes | None) -> onnx.TensorProto:
        if not uses_external_data(t):
            return t
        copy = onnx.TensorProto()
        copy.CopyFrom(t)
        del copy.external_data[:]
        copy.data_location = onnx.TensorProto.DEFAULT
        if raw is not None:
            copy.raw_data = raw
        return copy

    sizes = []
    for t in tensors:
        base = inline(t, None).ByteSize()
        length = dict((e.key, e.value) for e in t.external_data).get("length")
        n = int(length) if uses_external_data(t) else 0
        sizes.append(base + (1 + len(encode_varint(n)) + n if uses_external_data(t) else 0))
    graph_len = len(graph) + sum(1 + len(encode_varint(n)) + n for n in sizes)
    with open(data, "rb") as src, open(dst, "wb") as out:
        out.write(head + _GRAPH_KEY + encode_varint(graph_len) + graph)
        for t, n in zip(tensors, sizes, strict=True):
            raw = None
            if uses_external_data(t):
                where = dict((e.key, e.value) for e in t.external_data)
                src.seek(int(where.get("offset", 0)))
                raw = src.read(int(where["length"]))
            blob = inline(t, raw).SerializeToString()
            if len(blob) != n:
                raise AssertionError(f"initializer {t.name}: {len(blob)} bytes, {n} planned")
            out.write(_INITIALIZER_KEY + encode_varint(n) + blob)


def same_graph(a: onnx.ModelProto, b: onnx.ModelProto) -> list[str]:
    """What differs between two QDQ graphs as a multiset of nodes and a map of initializer
    values (order free); empty when they are the same graph (tests, the bench)."""
    from onnx import numpy_helper

    diffs = []
    na = sorted(n.SerializeToString() for n in a.graph.node)
    nb = sorted(n.SerializeToString() for n in b.graph.node)
    if na != nb:
        only_a = {n.name for n in a.graph.node} - {n.name for n in b.graph.node}
        only_b = {n.name for n in b.graph.node} - {n.name for n in a.graph.node}
        diffs.append(f"nodes differ ({len(na)} vs {len(nb)}; only in first {sorted(only_a)[:5]}, "
                     f"only in second {sorted(only_b)[:5]})")
    ia = {t.name: t for t in a.graph.initializer}
    ib = {t.name: t for t in b.graph.initializer}
    if ia.keys() != ib.keys():
        diffs.append(f"initializer names differ: {sorted(ia.keys() ^ ib.keys())[:5]}")
    for name in sorted(ia.keys() & ib.keys()):
        x, y = numpy_helper.to_array(ia[name]), numpy_helper.to_array(ib[name])
        if x.dtype != y.dtype or x.shape != y.shape or not np.array_equal(x, y):
            diffs.append(f"initializer {name} differs")
    return diffs
