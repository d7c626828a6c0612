"""Attention -> ``com.microsoft.GroupQueryAttention`` with a shareable KV buffer.

The exporter's attention (transformers' SDPA path as ``torch.onnx`` writes it) is, per
layer::

      Xq [B,S,H,D]         Xk [B,S,Hkv,D]                Xv [B,S,Hkv,D]
         |                    |                             |
     Transpose            Transpose                     Transpose
     [q_norm]             [k_norm]                          |
     [rotary(cos,sin)]    [rotary(cos,sin)]                 |
         |     past_k --> Concat --> present_k   past_v --> Concat --> present_v
         |                    |                             |
         |              [repeat_kv: Unsqueeze                |
         |               Expand Reshape]              [repeat_kv]
      Mul(c_q)          K^T (Transpose, or                  |
         |              Reshape Transpose Reshape)          |
         |              Mul(c_k)                            |
          \              /                                  |
            MatMul                                          |
              |                                             |
           [Add(mask)]                                      |
              |                                             |
           Softmax                                          |
           [IsNaN -> Where(0)]                              |
                    \                                      /
                                 MatMul
                                   |
                     [Reshape] Transpose(0,2,1,3)
                                   |
                             Reshape [B,S,H*D]  --> out

and becomes::

   Reshape(Xq)  Reshape(Xk)  Reshape(Xv)  past_k  past_v  seqlens_k  total_len  cos  sin
        \___________________________ GroupQueryAttention ___________________________/
                                |            |            |
                               out       present_k    present_v

- rotary moves into GQA (``do_rotary=1``): its cos/sin caches are the graph's own cos/sin
  subgraph at positions ``0..max_sequence_length-1``, copied to read a Range instead of
  ``position_ids``: ONNX Runtime folds it when the session is created, so the file keeps the
  rotary's small constants instead of the tables (Gemma 3 270M: 67 MB less at 32,768
  positions and two RoPE bases, for ~0.4 s more session creation and an ~83 MB higher peak
  while it folds, measured on a loaded 2-core machine);
- a q/k norm applied after the transpose (Gemma 3) is applied before it instead (it
  normalizes the last axis, which the transpose does not move);
- ``seqlens_k`` (``sum(attention_mask) - 1`` per row, int32) and ``total_sequence_length``
  come from the ``attention_mask`` input, so the graph's inputs stay the same as the plain
  graph's;
- GQA's mask is causal (plus ``local_window_size`` for sliding-window layers): exact for one
  sequence and for right-padded rows, as in ONNX Runtime GenAI's graphs. Left-padded
  batches need ``padding_mask=True``: the exporter's own mask then goes in as
  ``attention_bias`` and ``position_ids`` feed the rotary (every row counted full length).

With past and present bound to the same buffer (``[1, Hkv, capacity, D]``) GQA writes the
new keys/values in place: the runtime keeps one preallocated cache and copies nothing
between steps. With distinct buffers it concatenates, so the plain runtime still works.

All layers are fused or none: a graph with some layers left unfused would need both
cache contracts at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ._base import (MS_DOMAIN, FusionPass, attr, const_tensor, ints, make_derived_initializer,
                    make_initializer, producer, scalar)

_PRESENT_RE = re.compile(r"^present\.(\d+)\.(key|value)$")
#: torch.onnx's per-node module path (a repr'd list, outermost first)
NAME_SCOPES = "pkg.torch.onnx.name_scopes"
#: on a packed QKV MatMul: the name scopes of the three MatMuls it replaced, as one list
PACKED_SCOPES = "slmedge.packed_name_scopes"


class NoMatch(Exception):
    """Why a candidate attention is not fused."""


@dataclass
class _Rotary:
    x: ir.Value  # input of the rotary subgraph (BNSH)
    cos: ir.Value  # [B,1,S,D] (or broadcastable) cos as the graph computes it
    sin: ir.Value


@dataclass
class _Side:
    """One of q / k / v, traced back to its [B,S,heads,D] tensor."""

    x4: ir.Value  # [B,S,heads,D] before the transpose to BNSH
    norm: ir.Node | None = None  # SimplifiedLayerNormalization applied after the transpose
    rotary: _Rotary | None = None


@dataclass
class _Match:
    layer: int
    q: _Side
    k: _Side
    v: _Side
    past_k: ir.Value
    past_v: ir.Value
    present_k: ir.Value
    present_v: ir.Value
    out: ir.Value  # [B,S,H*D]
    mask: ir.Value | None
    scale: float
    num_heads: int
    kv_heads: int
    head_dim: int
    anchor: ir.Node  # insert the new nodes after this one
    nodes: list[ir.Node] = field(default_factory=list)


def _single_consumer(value: ir.Value) -> ir.Node | None:
    users = value.consumers()
    return users[0] if len(users) == 1 and not value.is_graph_output() else None


def _static_dims(value: ir.Value, rank: int) -> list:
    shape = value.shape
    if shape is None or shape.rank() != rank:
        raise NoMatch(f"{value.name}: unknown shape or not of rank {rank}")
    return [d if isinstance(d, int) else None for d in shape]


def _through_transpose_bnsh(value: ir.Value, what: str) -> ir.Value:
    node = producer(value, "Transpose")
    if node is None or list(attr(node, "perm", [])) != [0, 2, 1, 3]:
        raise NoMatch(f"{what}: expected Transpose(perm=[0,2,1,3]) before {value.name}")
    return node.inputs[0]


def _match_rotary(value: ir.Value) -> _Rotary | None:
    """``x*cos + concat(-x[..., D/2:], x[..., :D/2])*sin`` (rotate_half, not interleaved)."""
    add = producer(value, "Add")
    if add is None:
        return None
    muls = [producer(v, "Mul") for v in add.inputs]
    if any(m is None for m in muls):
        return None
    for rot_mul, plain_mul in (muls, muls[::-1]):
        for i in (0, 1):
            concat = producer(rot_mul.inputs[i], "Concat")
            if concat is None or len(concat.inputs) != 2:
                continue
            neg = producer(concat.inputs[0], "Neg")
            hi = producer(neg.inputs[0], "Slice") if neg else None
            lo = producer(concat.inputs[1], "Slice")
            if hi is None or lo is None or hi.inputs[0] is not lo.inputs[0]:
                continue
            x = lo.inputs[0]
            if x not in plain_mul.inputs:
                continue
            lo_start, lo_end = ints(lo.inputs[1]), ints(lo.inputs[2])
            hi_start = ints(hi.inputs[1])
            if lo_start != [0] or hi_start is None or lo_end != hi_start:
                return None
            dims = x.shape
            if dims is None or not isinstance(dims[-1], int) or dims[-1] != 2 * hi_start[0]:
                return None  # partial rotary or unknown head size: not handled
            cos = plain_mul.inputs[1 - plain_mul.inputs.index(x)]
            sin = rot_mul.inputs[1 - i]
            return _Rotary(x, cos, sin)
    return None


def _match_qk_side(value: ir.Value, what: str) -> _Side:
    """From the q (or new k) tensor in BNSH back to [B,S,heads,D]."""
    rotary = _match_rotary(value)
    if rotary is not None:
        value = rotary.x
    norm = producer(value, "SimplifiedLayerNormalization")
    if norm is not None and attr(norm, "axis", -1) in (-1, 3):
        value = norm.inputs[0]
    else:
        norm = None
    return _Side(_through_transpose_bnsh(value, what), norm, rotary)


def _through_repeat_kv(value: ir.Value) -> ir.Value:
    """``Reshape(Expand(Unsqueeze(x, 2)))`` (transformers' repeat_kv) -> x; else value."""
    reshape = producer(value, "Reshape")
    expand = producer(reshape.inputs[0], "Expand") if reshape else None
    unsq = producer(expand.inputs[0], "Unsqueeze") if expand else None
    if unsq is None or ints(unsq.inputs[1]) not in ([2], [-3]):
        return value
    return unsq.inputs[0]


def _present(value: ir.Value, graph: ir.Graph, what: str) -> tuple[ir.Value, ir.Value, int]:
    """(past input, present output, layer) of the Concat that appends to the cache."""
    value = _through_repeat_kv(value)
    concat = producer(value, "Concat")
    if concat is None or len(concat.inputs) != 2 or attr(concat, "axis") not in (-2, 2):
        raise NoMatch(f"{what}: {value.name} is not Concat(past, new, axis=-2)")
    past = concat.inputs[0]
    m = _PRESENT_RE.match(value.name or "")
    if not past.is_graph_input() or not value.is_graph_output() or m is None:
        raise NoMatch(f"{what}: {value.name} is not a present.N.* output of a past input")
    return past, value, int(m.group(1))


def _key_transposed(value: ir.Value) -> ir.Value:
    """K^T -> K: Transpose(perm=[0,1,3,2]) or torch's Reshape-Transpose(0,2,1)-Reshape."""
    t = producer(value, "Transpose")
    if t is not None and list(attr(t, "perm", [])) == [0, 1, 3, 2]:
        return t.inputs[0]
    r2 = producer(value, "Reshape")
    t = producer(r2.inputs[0], "Transpose") if r2 else None
    r1 = producer(t.inputs[0], "Reshape") if t else None
    if r1 is None or list(attr(t, "perm", [])) != [0, 2, 1]:
        raise NoMatch(f"{value.name}: K^T is neither Transpose(0,1,3,2) nor Reshape-Transpose-Reshape")
    return r1.inputs[0]


def _scaled(value: ir.Value) -> tuple[ir.Value, float]:
    mul = producer(value, "Mul")
    if mul is not None:
        for i in (0, 1):
            c = scalar(mul.inputs[1 - i])
            if c is not None:
                return mul.inputs[i], c
    return value, 1.0


def match_attention(softmax: ir.Node, graph: ir.Graph) -> _Match:
    """Trace one exported attention from its Softmax; raises :class:`NoMatch` with the reason."""
    if attr(softmax, "axis", -1) not in (-1, 3):
        raise NoMatch("Softmax is not over the last axis")
    scores = softmax.inputs[0]
    mask = None
    mm = producer(scores, "MatMul")
    if mm is None:
        add = producer(scores, "Add")
        if add is None:
            raise NoMatch("Softmax input is neither MatMul nor Add(MatMul, mask)")
        for i in (0, 1):
            if producer(add.inputs[i], "MatMul"):
                mm, mask = add.inputs[i].producer(), add.inputs[1 - i]
                break
        if mm is None:
            raise NoMatch("no MatMul(q, k^T) under the mask Add")
    probs = softmax.outputs[0]
    users = probs.consumers()
    if len(users) == 2 and {u.op_type for u in users} == {"IsNaN", "Where"}:
        where = next(u for u in users if u.op_type == "Where")
        if where.inputs[2] is not probs:
            raise NoMatch("unexpected Where after Softmax")
        probs = where.outputs[0]
    pv = _single_consumer(probs)
    if pv is None or pv.op_type != "MatMul" or pv.inputs[0] is not probs:
        raise NoMatch("attention probabilities do not feed one MatMul(p, v)")
    q_scaled, c_q = _scaled(mm.inputs[0])
    k_scaled, c_k = _scaled(mm.inputs[1])
    q = _match_qk_side(q_scaled, "query")
    past_k, present_k, layer = _present(_key_transposed(k_scaled), graph, "key")
    past_v, present_v, layer_v = _present(pv.inputs[1], graph, "value")
    if layer_v != layer:
        raise NoMatch(f"key of layer {layer} but value of layer {layer_v}")
    k = _match_qk_side(present_k.producer().inputs[1], "key")
    v = _Side(_through_transpose_bnsh(present_v.producer().inputs[1], "value"))
    # The output: [B,H,S,D] -> (Reshape no-op) -> Transpose -> Reshape [B,S,H*D].
    o = pv.outputs[0]
    node = _single_consumer(o)
    if node is not None and node.op_type == "Reshape" and node.outputs[0].shape is not None \
            and node.outputs[0].shape.rank() == 4:
        o, node = node.outputs[0], _single_consumer(node.outputs[0])
    if node is None or node.op_type != "Transpose" or list(attr(node, "perm", [])) != [0, 2, 1, 3]:
        raise NoMatch("attention output is not transposed back to [B,S,H,D]")
    final = _single_consumer(node.outputs[0])
    if final is None or final.op_type != "Reshape" or final.outputs[0].shape is None \
            or final.outputs[0].shape.rank() != 3:
        raise NoMatch("attention output is not reshaped to [B,S,H*D]")
    _, _, num_heads, head_dim = _static_dims(q.x4, 4)
    _, _, kv_heads, kv_dim = _static_dims(k.x4, 4)
    if None in (num_heads, head_dim, kv_heads) or kv_dim != head_dim or num_heads % kv_heads:
        raise NoMatch(f"head layout q={q.x4.shape} k={k.x4.shape} is not static GQA")
    if _static_dims(v.x4, 4)[2:] != [kv_heads, head_dim]:
        raise NoMatch("value heads differ from key heads")
    if (q.rotary is None) != (k.rotary is None):
        raise NoMatch("rotary on only one of query and key")
    return _Match(layer, q, k, v, past_k, past_v, present_k, present_v, final.outputs[0], mask,
                  c_q * c_k, num_heads, kv_heads, head_dim, final)


# -- cos/sin caches --------------------------------------------------------------------------


def _cone(outputs: list[ir.Value]) -> tuple[list[ir.Node], set[ir.Value]]:
    """Nodes computing ``outputs`` and the graph inputs they read."""
    seen: set[int] = set()
    nodes: list[ir.Node] = []
    inputs: set[ir.Value] = set()
    stack = list(outputs)
    while stack:
        v = stack.pop()
        if v is None:
            continue
        node = v.producer()
        if node is None:
            if v.is_graph_input():
                inputs.add(v)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        nodes.append(node)
        stack.extend(node.inputs)
    return nodes, inputs


def evaluate_cos_sin(model: ir.Model, cos: ir.Value, sin: ir.Value, length: int) -> tuple[np.ndarray, np.ndarray]:
    """The graph's cos/sin at positions ``0..length-1``, as ``[length, D]`` arrays."""
    import onnx
    import onnxruntime as ort

    nodes, inputs = _cone([cos, sin])
    names = {v.name for v in inputs}
    if names - {"position_ids"}:
        raise NoMatch(f"cos/sin depend on {sorted(names)}, not only on position_ids")
    order = {id(n): i for i, n in enumerate(model.graph)}
    nodes.sort(key=lambda n: order[id(n)])
    inits = {}
    for n in nodes:
        for v in n.inputs:
            if v is not None and v.const_value is not None and v.producer() is None:
                proto = ir.serde.serialize_tensor(v.const_value)
                proto.name = v.name  # a lifted constant's tensor may carry no name
                inits[v.name] = proto
    graph = onnx.helper.make_graph(
        [ir.serde.serialize_node(n) for n in nodes], "cos_sin",
        [onnx.helper.make_tensor_value_info("position_ids", onnx.TensorProto.INT64, [1, length])],
        [onnx.helper.make_tensor_value_info(cos.name, (cos.dtype or ir.DataType.FLOAT).value, None),
         onnx.helper.make_tensor_value_info(sin.name, (sin.dtype or ir.DataType.FLOAT).value, None)],
        list(inits.values()),
    )
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
    proto = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=model.ir_version)
    try:
        sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        c, s = sess.run(None, {"position_ids": np.arange(length, dtype=np.int64)[None]})
    except Exception as e:  # ORT raises its own pybind types; the fusion is then skipped
        raise NoMatch(f"could not evaluate the cos/sin subgraph: {str(e).splitlines()[0][:200]}") from e
    c, s = np.asarray(c).reshape(length, -1), np.asarray(s).reshape(length, -1)
    half = c.shape[1] // 2
    if not (np.array_equal(c[:, :half], c[:, half:]) and np.array_equal(s[:, :half], s[:, half:])):
        raise NoMatch("cos/sin halves differ: not the rotate_half layout")
    return c[:, :half], s[:, :half]


#: ops that act on each element alone (with a scalar constant at most) between rotate_half's
#: cat(freqs, freqs) and cos/sin
_ELEMENTWISE = {"Cos", "Sin", "Cast", "Mul", "Div"}


def _duplicating_concat(nodes: list[ir.Node], outputs: tuple[ir.Value, ...]) -> ir.Node | None:
    """The ``Concat(x, x)`` on the last axis that feeds ``outputs`` through elementwise
    ops only (transformers' ``cat((freqs, freqs), dim=-1)``), or None. Computing from ``x``
    gives the tables' first half directly: half the work and memory when ONNX Runtime folds."""
    concats = [n for n in nodes if n.op_type == "Concat" and not n.domain and len(n.inputs) == 2
               and n.inputs[0] is n.inputs[1] and attr(n, "axis") in (-1, n.inputs[0].shape and
                                                                      len(n.inputs[0].shape) - 1)]
    if len(concats) != 1:
        return None
    stack, ends = [concats[0].outputs[0]], {id(v) for v in outputs}
    while stack:
        v = stack.pop()
        if id(v) in ends:
            continue
        if v.is_graph_output() or not v.uses():
            return None
        for use in v.uses():
            node = use.node
            others = [x for x in node.inputs if x is not v]
            if node.op_type not in _ELEMENTWISE or node.domain or any(
                    x is None or x.const_value is None or x.const_value.size != 1 for x in others):
                return None
            stack.extend(node.outputs)
    return concats[0]


#   Range(0, L) -> Unsqueeze [1, L]  (in place of position_ids)
#        |
#   copy of the graph's cos/sin nodes (inv_freq, scaling: its own small constants)
#        |                     |
#   Reshape [L, D]        Reshape [L, D]
#   Slice [:, :D/2]       Slice [:, :D/2]
#        |                     |
#    cos_cache             sin_cache
def cos_sin_in_graph(graph: ir.Graph, cos: ir.Value, sin: ir.Value, length: int, half: int,
                     prefix: str) -> tuple[ir.Value, ir.Value] | None:
    """GroupQueryAttention's ``[length, half]`` cos/sin caches computed in the graph from
    constants only: the graph's own cos/sin nodes, copied, read positions ``0..length-1``
    from a Range instead of ``position_ids``. ONNX Runtime folds them when the session is
    created (same kernels as :func:`evaluate_cos_sin`, same numbers) while the file holds
    only the rotary's own constants instead of two ``length x half`` fp32 tables. None when
    a node cannot be copied (a subgraph attribute): the caller then stores the tables."""
    nodes, inputs = _cone([cos, sin])
    if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
           for n in nodes for a in n.attributes.values()):
        return None
    order = {id(n): i for i, n in enumerate(graph)}
    nodes.sort(key=lambda n: order[id(n)])
    new: list[ir.Node] = []

    def const(name: str, array: np.ndarray) -> ir.Value:
        return make_initializer(graph, f"{prefix}.{name}", array)

    new.append(ir.node("Range", [const("start", np.array(0, np.int64)), const("limit", np.array(length, np.int64)),
                                 const("delta", np.array(1, np.int64))], name=f"{prefix}.positions"))
    new.append(ir.node("Unsqueeze", [new[-1].outputs[0], const("batch_axis", np.array([0], np.int64))],
                       name=f"{prefix}.position_ids"))
    mapping: dict[int, ir.Value] = {id(v): new[-1].outputs[0] for v in inputs}
    halved = _duplicating_concat(nodes, (cos, sin))
    for i, n in enumerate(nodes):
        if n is halved:  # cat(freqs, freqs): the copy computes the half the caches keep
            mapping[id(n.outputs[0])] = mapping.get(id(n.inputs[0]), n.inputs[0])
            continue
        copy = ir.node(n.op_type, [None if v is None else mapping.get(id(v), v) for v in n.inputs],
                       {a.name: a for a in n.attributes.values()}, domain=n.domain, version=n.version,
                       num_outputs=len(n.outputs), name=f"{prefix}.{n.name or f'{n.op_type}_{i}'}")
        for old, out in zip(n.outputs, copy.outputs):
            mapping[id(old)] = out
            if old.dtype is not None:
                out.dtype = old.dtype
        new.append(copy)
    shape = const("table_shape", np.array([length, -1], np.int64))
    starts, ends, axes = (const(k, np.array([v], np.int64)) for k, v in
                          (("slice_start", 0), ("slice_end", half), ("slice_axis", 1)))
    caches = []
    for what, value in (("cos", cos), ("sin", sin)):
        new.append(ir.node("Reshape", [mapping[id(value)], shape], name=f"{prefix}.{what}_table"))
        new.append(ir.node("Slice", [new[-1].outputs[0], starts, ends, axes], name=f"{prefix}.{what}_cache"))
        out = new[-1].outputs[0]
        out.name, out.shape = f"{prefix}.{what}_cache", ir.Shape([length, half])
        if value.dtype is not None:
            out.dtype = value.dtype
        caches.append(out)
    graph.insert_before(next(iter(graph)), new)
    return caches[0], caches[1]


# -- the pass --------------------------------------------------------------------------------


class GroupQueryAttentionFusion(FusionPass):
    """Fuse every layer's attention into one GroupQueryAttention node (all or none).

    ``max_sequence_length``: positions the rotary caches cover (the runtime's KV capacity
    limit). ``sliding_windows``: layer index -> window (tokens a query sees, itself
    included) for sliding-window layers; required when layers use different masks.
    """

    name = "GroupQueryAttention"

    def __init__(self, max_sequence_length: int = 4096, sliding_windows: dict[int, int] | None = None,
                 pack_qkv: bool = True, padding_mask: bool = False):
        super().__init__()
        self.padding_mask = padding_mask
        self.max_sequence_length = max_sequence_length
        self.sliding_windows = dict(sliding_windows or {})
        self.pack_qkv = pack_qkv
        self.rotary = 0
        self.packed = 0

    def fuse(self, model: ir.Model) -> int:
        graph = model.graph
        self.rotary = self.packed = 0
        softmaxes = [n for n in graph if n.op_type == "Softmax" and not n.domain]
        if not softmaxes:
            self.reasons.append("no Softmax: no attention to fuse")
            return 0
        matches: list[_Match] = []
        for node in softmaxes:
            try:
                matches.append(match_attention(node, graph))
            except NoMatch as e:
                self.reasons.append(f"{node.name}: {e}")
        if self.reasons:
            self.reasons.insert(0, f"{len(softmaxes) - len(matches)} of {len(softmaxes)} "
                                "attentions do not match; none fused")
            return 0
        masks = {id(m.mask) for m in matches}
        if len(masks) > 1 and not self.sliding_windows:
            self.reasons.append("layers use different attention masks (sliding windows?) and no "
                                "sliding_windows were given; none fused")
            return 0
        if "attention_mask" not in {v.name for v in graph.inputs}:
            self.reasons.append("no attention_mask input to derive seqlens_k from")
            return 0
        try:
            if any(m.q.rotary is not None for m in matches):
                self._position_ids(graph)
            caches = self._rotary_caches(model, matches)
        except NoMatch as e:
            self.reasons.append(str(e))
            return 0
        seqlens_k, total = self._lengths(graph) if self.padding_mask else self._lengths_from_mask(graph)
        for m in matches:
            self._rewrite(graph, m, seqlens_k, total, caches)
        self._past_length_from_mask(graph, [m.past_k for m in matches] + [m.past_v for m in matches])
        ir.passes.common.RemoveUnusedNodesPass()(model)
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        model.metadata_props["slmedge.kv_cache"] = "shared_buffer"
        model.metadata_props["slmedge.max_sequence_length"] = str(self.max_sequence_length)
        # which padded batches are exact (the runtime batches right-padded rows only on "right")
        model.metadata_props["slmedge.batch_padding"] = "mask" if self.padding_mask else "right"
        return len(matches)

    def _rotary_caches(self, model, matches) -> dict:
        caches: dict[tuple[int, int], tuple[ir.Value, ir.Value]] = {}
        tables: dict[tuple[int, int], np.ndarray] = {}
        for m in matches:
            for side in (m.q, m.k):
                r = side.rotary
                if r is None:
                    continue
                key = (id(r.cos), id(r.sin))
                if key in caches:
                    continue
                # evaluated here to check the rotate_half layout and compare q/k tables
                cos, sin = evaluate_cos_sin(model, r.cos, r.sin, self.max_sequence_length)
                tables[key] = cos
                caches[key] = (cos_sin_in_graph(model.graph, r.cos, r.sin, self.max_sequence_length,
                                                cos.shape[1], f"gqa.rotary{len(caches)}")
                               or (make_initializer(model.graph, "gqa.cos_cache", cos),
                                   make_initializer(model.graph, "gqa.sin_cache", sin)))
            if m.q.rotary is not None:
                kq = (id(m.q.rotary.cos), id(m.q.rotary.sin))
                kk = (id(m.k.rotary.cos), id(m.k.rotary.sin))
                if kq != kk and not np.array_equal(tables[kq], tables[kk]):
                    raise NoMatch(f"layer {m.layer}: query and key use different rotary tables")
        return caches

    @staticmethod
    def _lengths(graph: ir.Graph) -> tuple[ir.Value, ir.Value]:
        """``seqlens_k = total - 1`` for every row and ``total_sequence_length``, int32.

        Every row is treated as full length: padding is masked by ``attention_bias`` (the
        exporter's own mask), as in the plain graph."""
        mask = next(v for v in graph.inputs if v.name == "attention_mask")
        one = make_initializer(graph, "gqa.one", np.array(1, dtype=np.int64))
        zero_ix = make_initializer(graph, "gqa.batch_index", np.array([0], dtype=np.int64))
        nodes = [ir.node("Shape", [mask], name="gqa.mask_shape")]
        shape = nodes[0].outputs[0]
        nodes.append(ir.node("Gather", [shape, one], {"axis": 0}, name="gqa.total_len_i64"))
        total64 = nodes[-1].outputs[0]
        nodes.append(ir.node("Gather", [shape, zero_ix], {"axis": 0}, name="gqa.batch"))
        batch = nodes[-1].outputs[0]
        nodes.append(ir.node("Sub", [total64, one], name="gqa.last_index"))
        nodes.append(ir.node("Expand", [nodes[-1].outputs[0], batch], name="gqa.last_index_per_row"))
        nodes.append(ir.node("Cast", [nodes[-1].outputs[0]], {"to": ir.DataType.INT32}, name="gqa.seqlens_k"))
        seqlens_k = nodes[-1].outputs[0]
        nodes.append(ir.node("Cast", [total64], {"to": ir.DataType.INT32}, name="gqa.total_sequence_length"))
        total = nodes[-1].outputs[0]
        seqlens_k.name, total.name = "seqlens_k", "total_sequence_length"
        seqlens_k.dtype = total.dtype = ir.DataType.INT32
        seqlens_k.shape, total.shape = ir.Shape(["batch"]), ir.Shape([])
        first = next(iter(graph))
        graph.insert_before(first, nodes)
        return seqlens_k, total

    @staticmethod
    def _lengths_from_mask(graph: ir.Graph) -> tuple[ir.Value, ir.Value]:
        """``seqlens_k = sum(attention_mask, axis 1) - 1`` per row and ``total_sequence_length``
        (the mask's length), int32: GQA's own causal mask then covers one sequence or
        right-padded rows, with no mask tensor built or read per step."""
        mask = next(v for v in graph.inputs if v.name == "attention_mask")
        one = make_initializer(graph, "gqa.one", np.array(1, dtype=np.int64))
        axis = make_initializer(graph, "gqa.sum_axis", np.array([1], dtype=np.int64))
        nodes = [ir.node("ReduceSum", [mask, axis], {"keepdims": 0}, name="gqa.row_lengths")]
        nodes.append(ir.node("Sub", [nodes[-1].outputs[0], one], name="gqa.last_index"))
        nodes.append(ir.node("Cast", [nodes[-1].outputs[0]], {"to": ir.DataType.INT32}, name="gqa.seqlens_k"))
        seqlens_k = nodes[-1].outputs[0]
        nodes.append(ir.node("Shape", [mask], {"start": 1, "end": 2}, name="gqa.mask_length"))
        nodes.append(ir.node("Squeeze", [nodes[-1].outputs[0]], name="gqa.total_len_i64"))
        nodes.append(ir.node("Cast", [nodes[-1].outputs[0]], {"to": ir.DataType.INT32}, name="gqa.total_sequence_length"))
        total = nodes[-1].outputs[0]
        seqlens_k.name, total.name = "seqlens_k", "total_sequence_length"
        seqlens_k.dtype = total.dtype = ir.DataType.INT32
        seqlens_k.shape, total.shape = ir.Shape(["batch"]), ir.Shape([])
        graph.insert_before(next(iter(graph)), nodes)
        return seqlens_k, total

    def _as_bsh(self, graph: ir.Graph, side: _Side, heads: int, head_dim: int, prefix: str,
                new: list[ir.Node]) -> ir.Value:
        """[B,S,heads*D] for GQA: the pre-reshape 3-D tensor when there is one."""
        x = side.x4
        if side.norm is not None:
            attrs = {k: a.value for k, a in side.norm.attributes.items()}
            norm = ir.node("SimplifiedLayerNormalization", [x, *side.norm.inputs[1:]], attrs,
                           name=f"{prefix}.norm", num_outputs=1)
            new.append(norm)
            x = norm.outputs[0]
            x.dtype = side.x4.dtype
        else:
            reshape = producer(x, "Reshape")
            if reshape is not None:
                src = reshape.inputs[0]
                if src.shape is not None and src.shape.rank() == 3 and src.shape[2] == heads * head_dim:
                    return src
        shape = make_initializer(graph, "gqa.bsh_shape", np.array([0, 0, heads * head_dim], dtype=np.int64))
        node = ir.node("Reshape", [x, shape], name=f"{prefix}.to_bsh")
        new.append(node)
        out = node.outputs[0]
        out.dtype = side.x4.dtype
        return out

    @staticmethod
    def _past_length_from_mask(graph: ir.Graph, pasts: list[ir.Value]) -> None:
        """The mask subgraph reads the past length from ``past_key_values.*`` shapes; with a
        shared buffer that axis is the buffer's capacity, so read it as
        ``attention_mask`` length - ``input_ids`` length instead."""
        shapes = [n for p in pasts for n in p.consumers() if n.op_type == "Shape"]
        if not shapes:
            return
        mask = next(v for v in graph.inputs if v.name == "attention_mask")
        ids = next(v for v in graph.inputs if v.name == "input_ids")
        nodes = [ir.node("Shape", [mask], {"start": 1, "end": 2}, name="gqa.total_len_1d"),
                 ir.node("Shape", [ids], {"start": 1, "end": 2}, name="gqa.new_len_1d")]
        nodes.append(ir.node("Sub", [nodes[0].outputs[0], nodes[1].outputs[0]], name="gqa.past_len_1d"))
        past_len = nodes[-1].outputs[0]
        past_len.dtype, past_len.shape = ir.DataType.INT64, ir.Shape([1])
        graph.insert_before(next(iter(graph)), nodes)
        for node in shapes:
            start, end = attr(node, "start", 0), attr(node, "end", None)
            if (start, end) in ((2, 3), (-2, -1)):
                ir.convenience.replace_all_uses_with(node.outputs[0], past_len)
            elif (start, end) in ((0, 1), (1, 2), (3, 4), (-1, None), (3, None)):
                continue  # batch, heads, head size: the same in the buffer
            else:
                raise NoMatch(f"{node.name} reads the whole past shape; cannot rewire it")

    @staticmethod
    def _packed_qkv(graph: ir.Graph, q: ir.Value, k: ir.Value, v: ir.Value, prefix: str,
                    new: list[ir.Node]) -> ir.Value | None:
        """One [B,S,(H+2Hkv)D] tensor for GQA's packed-QKV mode, or None.

        Three projections of the same input (``MatMul(x, W)`` [+ ``Add(b)``], constant W and
        b) become one MatMul on the concatenated weights (one larger GEMV per decode step
        instead of three, as ONNX Runtime GenAI's builder does). Contiguous ``Slice`` s of
        one tensor (Phi-3's fused qkv_proj) are that tensor.

            x --MatMul(Wq)--+            x --MatMul([Wq|Wk|Wv])--[Add([bq|bk|bv])]--> qkv
            x --MatMul(Wk)--+--> GQA  =>
            x --MatMul(Wv)--+
        """
        slices = [producer(t, "Slice") for t in (q, k, v)]
        if all(slices) and len({id(sl.inputs[0]) for sl in slices}) == 1:
            src = slices[0].inputs[0]
            bounds = [(ints(sl.inputs[1]), ints(sl.inputs[2]),
                       ints(sl.inputs[3]) if len(sl.inputs) > 3 and sl.inputs[3] is not None else None)
                      for sl in slices]
            last = src.shape[-1] if src.shape is not None else None
            if all(ax in ([-1], [2]) and st is not None and en is not None for st, en, ax in bounds) \
                    and bounds[0][0] == [0] and bounds[0][1] == bounds[1][0] \
                    and bounds[1][1] == bounds[2][0] and isinstance(last, int) \
                    and bounds[2][1][0] >= last \
                    and all(len(sl.inputs) < 5 or ints(sl.inputs[4]) == [1] for sl in slices):
                return src
            return None
        split = producer(q, "Split")
        if split is not None and [o for o in split.outputs] == [q, k, v] \
                and attr(split, "axis", 0) in (-1, 2):
            return split.inputs[0]  # GPT-2's c_attn output split into q, k, v
        parts, scopes = [], []
        for t in (q, k, v):
            bias = None
            add = producer(t, "Add")
            if add is not None:
                consts = [i for i in (0, 1) if const_tensor(add.inputs[i]) is not None]
                if len(consts) != 1:
                    return None
                bias, t = const_tensor(add.inputs[consts[0]]), add.inputs[1 - consts[0]]
            mm = producer(t, "MatMul")
            # Tensors, not arrays: a streamed export's weights are read when written.
            w = const_tensor(mm.inputs[1]) if mm is not None else None
            if w is None or len(w.shape) != 2 or (bias is not None and len(bias.shape) != 1):
                return None
            parts.append((mm.inputs[0], w, bias))
            scopes.append(mm.metadata_props.get(NAME_SCOPES, "[]"))
        if len({id(x) for x, _, _ in parts}) != 1 or len({b is None for _, _, b in parts}) != 1 \
                or len({(w.dtype, int(w.shape[0])) for _, w, _ in parts}) != 1:
            return None
        x = parts[0][0]
        ws = [w for _, w, _ in parts]
        weight = make_derived_initializer(
            graph, f"{prefix}.qkv_proj.weight", lambda *a: np.concatenate(a, axis=1), ws,
            ws[0].dtype, (int(ws[0].shape[0]), sum(int(w.shape[1]) for w in ws)))
        node = ir.node("MatMul", [x, weight], name=f"{prefix}.qkv_proj")
        # which modules' weights were packed: a GGUF's own blocks of each are found by these
        # (quantize/streaming.py, PACKED_SCOPES)
        node.metadata_props[PACKED_SCOPES] = "[" + ", ".join(scopes) + "]"
        new.append(node)
        out = node.outputs[0]
        if parts[0][2] is not None:
            bs = [b for _, _, b in parts]
            bias = make_derived_initializer(
                graph, f"{prefix}.qkv_proj.bias", lambda *a: np.concatenate(a), bs, bs[0].dtype,
                (sum(int(b.shape[0]) for b in bs),))
            node = ir.node("Add", [out, bias], name=f"{prefix}.qkv_proj.bias_add")
            new.append(node)
            out = node.outputs[0]
        out.dtype = q.dtype
        return out

    @staticmethod
    def _position_ids(graph: ir.Graph) -> ir.Value:
        pos = next((v for v in graph.inputs if v.name == "position_ids"), None)
        if pos is None:
            raise NoMatch("rotary without a position_ids input")
        return pos

    def _rewrite(self, graph, m: _Match, seqlens_k, total, caches) -> None:
        prefix = f"layers.{m.layer}.attn"
        new: list[ir.Node] = []
        q = self._as_bsh(graph, m.q, m.num_heads, m.head_dim, f"{prefix}.q", new)
        k = self._as_bsh(graph, m.k, m.kv_heads, m.head_dim, f"{prefix}.k", new)
        v = self._as_bsh(graph, m.v, m.kv_heads, m.head_dim, f"{prefix}.v", new)
        packed = self._packed_qkv(graph, q, k, v, prefix, new) if self.pack_qkv else None
        if packed is not None:
            q, k, v = packed, None, None
            self.packed += 1
        inputs: list[ir.Value | None] = [q, k, v, m.past_k, m.past_v, seqlens_k, total, None, None,
                                         None, m.mask if self.padding_mask else None]
        attrs = {"num_heads": m.num_heads, "kv_num_heads": m.kv_heads, "scale": float(m.scale),
                 "local_window_size": int(self.sliding_windows.get(m.layer, -1))}
        if m.q.rotary is not None:
            cos, sin = caches[(id(m.q.rotary.cos), id(m.q.rotary.sin))]
            # Without the padding mask GQA derives positions from seqlens_k (the same for one
            # sequence or right padding); position_ids are only needed for left padding.
            inputs[7:10] = [cos, sin, self._position_ids(graph) if self.padding_mask else None]
            attrs.update(do_rotary=1, rotary_interleaved=0)
            self.rotary += 1
        while inputs[-1] is None:
            inputs.pop()
        gqa = ir.node("GroupQueryAttention", inputs, attrs, domain=MS_DOMAIN, num_outputs=3,
                      name=f"{prefix}.GroupQueryAttention")
        new.append(gqa)
        out, pk, pv = gqa.outputs
        out.dtype = m.out.dtype
        out.shape = m.out.shape
        graph.insert_after(m.anchor, new)
        ir.convenience.replace_all_uses_with(m.out, out)
        for old, fresh in ((m.present_k, pk), (m.present_v, pv)):
            name = old.name
            index = list(graph.outputs).index(old)
            old.name = f"{name}.unfused"
            fresh.name = name
            fresh.dtype = old.dtype
            fresh.shape = ir.Shape(["batch", m.kv_heads, "present_sequence_length", m.head_dim])
            graph.outputs[index] = fresh
