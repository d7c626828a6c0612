"""Trace a few decoder layers, replicate them to N: the full trace's graph in less time.

torch.onnx's trace is linear in the layer count and was most of a small model's export
(Qwen2.5-0.5B fp16: 29 of 54 s). Every decoder layer of a uniform model traces to the same
nodes; only names change, and, once :func:`canonical_trace` has named every node and value by
position, every name is affine in the layer index k and the layer count n
(``model.model.layers.7.mlp...``, ``present.7.key``, ``v1234``). So two small traces of the
real config, with :data:`SMALL` and :data:`LARGE` layers, determine the N-layer graph::

    small (3 layers):  head | c0 c1 c2          | rest | L0 | L1 | L2           | tail
    large (5 layers):  head | c0 c1 c2 c3 c4    | rest | L0 | L1 | L2 | L3 | L4 | tail
    N layers:          head | c0 ... c(N-1)     | rest | L0 | L1 ... L(N-1)    | tail

(``c``: the nodes the past's cache entries make before the first layer). Middle copies are
fitted per digit run over k and n from four samples (one slope each, checked on the rest);
the first and the last copy, head, rest and tail over n from the two traces (layer 0's names
lack some counters, ``node_cat`` vs ``node_cat_1``; the last layer's output feeds the final
norm). Any mismatch (a layer of another kind, a name that is not affine, a shape or attribute
that differs) raises :class:`NotReplicable` and the caller traces the whole model.
tests/parity/test_layer_template.py compares the replicated graph with the full trace node by
node, and after the export's passes weight by weight, for the tiny architectures.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Callable
from dataclasses import dataclass

import onnx_ir as ir

from slmedge.runtimes.errors import SlmEdgeError

from slmedge.exporter.architectures import ArchitectureSpec
from slmedge.exporter.onnx.convert import DEFAULT_OPSET, past_names, present_names, trace_decoder
from .trace_names import _SCOPES, reset_name_counters

#: layer counts of the two template traces; below ``MIN_LAYERS`` the whole model is traced
#: (the two templates would cost about as much as the full trace)
SMALL, LARGE = 3, 5
MIN_LAYERS = 12

Say = Callable[[str], None]

_DIGITS = re.compile(r"\d+")
_LAYER_SCOPE = re.compile(r"\.(?:layers|h)\.(\d+)$")
_LAYER_NAME = re.compile(r"\.(?:layers|h)\.(\d+)\.")

class NotReplicable(SlmEdgeError):
    """The small traces do not determine the N-layer graph; trace the whole model."""


def fit(samples: list[tuple[tuple[int, int], str | None]]) -> Callable[[int, int], str | None]:
    """A function of (layer index k, layer count n) that gives each sample's string: the same
    text between digit runs and each digit run ``v0 + a*k + c*n`` (integer a, c). Raises
    NotReplicable when there is none."""
    texts = [s for _, s in samples]
    if all(t == texts[0] for t in texts):
        return lambda _k, _n, t=texts[0]: t
    if any(t is None for t in texts):
        raise NotReplicable(f"an input is missing in some layers only: {texts}")
    skeletons = [_DIGITS.split(t) for t in texts]
    if any(s != skeletons[0] for s in skeletons):
        raise NotReplicable(f"names differ beyond their numbers: {texts}")
    runs = [_DIGITS.findall(t) for t in texts]
    points = [p for p, _ in samples]
    (k0, n0) = points[0]

    def slope(values: list[int], axis: int) -> int:
        for (p, v) in zip(points, values):
            for (q, w) in zip(points, values):
                if p[1 - axis] == q[1 - axis] and q[axis] != p[axis]:
                    step, rest = divmod(w - v, q[axis] - p[axis])
                    if rest:
                        raise NotReplicable(f"a number is not affine in the layer: {texts}")
                    return step
        return 0

    lines = []
    for i, first in enumerate(runs[0]):
        values = [int(r[i]) for r in runs]
        if len(set(values)) > 1 and any(r[i] != str(int(r[i])) for r in runs):
            raise NotReplicable(f"a number with leading zeros changes: {texts}")
        a, c = slope(values, 0), slope(values, 1)
        if any(v != values[0] + a * (k - k0) + c * (n - n0) for (k, n), v in zip(points, values)):
            raise NotReplicable(f"a number is not affine in the layer: {texts}")
        lines.append((values[0], a, c, first))
    skeleton = skeletons[0]

    def at(k: int, n: int) -> str:
        parts = [skeleton[0]]
        for (v0, a, c, text), after in zip(lines, skeleton[1:]):
            parts += [text if a == c == 0 else str(v0 + a * (k - k0) + c * (n - n0)), after]
        return "".join(parts)

    return at


@dataclass
class _Sections:
    """A trace's nodes split into prefix, one list per layer, tail (by module scope)."""

    prefix: list[ir.Node]
    layers: list[list[ir.Node]]
    tail: list[ir.Node]


def _layer_of_node(node: ir.Node) -> int | None:
    scopes = node.metadata_props.get(_SCOPES)
    if not scopes:
        return None
    found = None
    for scope in scopes.strip("[]").split(","):
        match = _LAYER_SCOPE.search(scope.strip().strip("'\""))
        if match:
            found = int(match.group(1))
    return found


def _sections(model: ir.Model, layers: int) -> _Sections:
    prefix: list[ir.Node] = []
    blocks: list[list[ir.Node]] = [[] for _ in range(layers)]
    tail: list[ir.Node] = []
    current = -1  # nodes run prefix, layer 0, 1, ..., tail: anything else is not replicable
    for node in model.graph:
        if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
               for attr in node.attributes.values()):
            raise NotReplicable(f"node {node.name} has a subgraph")
        k = _layer_of_node(node)
        if k is None:
            (prefix if current == -1 else tail).append(node)
            if current >= 0:
                current = layers  # in the tail
            continue
        if k < current or current == layers or k >= layers:
            raise NotReplicable(f"node {node.name} of layer {k} is out of the layer order")
        current = k
        blocks[k].append(node)
    return _Sections(prefix, blocks, tail)


def _node_strings(node: ir.Node) -> list[str | None]:
    """Every name a node carries: its own, its inputs', its outputs', its metadata."""
    return [node.name,
            *(v.name if v is not None else None for v in node.inputs),
            *(v.name for v in node.outputs),
            *(node.metadata_props[k] for k in sorted(node.metadata_props))]


def _attr_key(attr: ir.Attr):
    value = attr.value
    if attr.type in (ir.AttributeType.TENSOR,):
        return (attr.name, attr.type, value.dtype, tuple(value.shape), value.tobytes())
    if attr.type == ir.AttributeType.TENSORS:
        return (attr.name, attr.type, tuple((t.dtype, tuple(t.shape), t.tobytes()) for t in value))
    return (attr.name, attr.type, repr(value))


def _structure(node: ir.Node):
    """What must be the same in every copy of a node (names aside)."""
    return (node.domain, node.op_type, node.overload, node.version, len(node.inputs),
            tuple(sorted(node.metadata_props)),
            tuple(_attr_key(a) for a in node.attributes.values()),
            tuple((str(v.shape), str(v.type)) for v in node.outputs))


class _NodeTemplate:
    """One node whose copies differ only in names: strings fitted over the samples."""

    def __init__(self, samples: list[tuple[tuple[int, int], ir.Node]]):
        nodes = [n for _, n in samples]
        first = _structure(nodes[0])
        if any(_structure(n) != first for n in nodes[1:]):
            raise NotReplicable(f"node {nodes[0].name} differs in structure between layers")
        strings = [_node_strings(n) for n in nodes]
        self.fits = [fit([(x, s[i]) for (x, _), s in zip(samples, strings)])
                     for i in range(len(strings[0]))]
        self.node = nodes[-1]

    def emit(self, k: int, n: int, values: dict[str, ir.Value]) -> ir.Node:
        """The copy for layer ``k`` of an ``n``-layer graph (its inputs from ``values``,
        its outputs added there)."""
        node = self.node
        names = [f(k, n) for f in self.fits]
        n_in, n_out = len(node.inputs), len(node.outputs)
        inputs = []
        for name in names[1:1 + n_in]:
            if name is None:
                inputs.append(None)
            elif name not in values:
                raise NotReplicable(f"input {name} of node {names[0]} is not defined before it")
            else:
                inputs.append(values[name])
        outputs = []
        for name, old in zip(names[1 + n_in:1 + n_in + n_out], node.outputs):
            out = ir.Value(name=name, shape=copy.copy(old.shape) if old.shape is not None else None,
                           type=old.type, doc_string=old.doc_string,
                           metadata_props=dict(old.metadata_props) or None)
            values[name] = out
            outputs.append(out)
        meta = dict(zip(sorted(node.metadata_props), names[1 + n_in + n_out:]))
        attrs = [ir.Attr(a.name, a.type, a.value, a.ref_attr_name, doc_string=a.doc_string)
                 for a in node.attributes.values()]
        return ir.Node(node.domain, node.op_type, inputs, attrs, overload=node.overload,
                       outputs=outputs, version=node.version, name=names[0],
                       doc_string=node.doc_string, metadata_props=meta)


def _copy_value(old: ir.Value, name: str) -> ir.Value:
    return ir.Value(name=name, shape=copy.copy(old.shape) if old.shape is not None else None,
                    type=old.type, doc_string=old.doc_string,
                    metadata_props=dict(old.metadata_props) or None)


def _layer_inits(model: ir.Model, layers: int):
    """Initializers split as prefix / per layer / tail, in the graph's order."""
    prefix, tail = [], []
    blocks: list[list[ir.Value]] = [[] for _ in range(layers)]
    current = -1
    for value in model.graph.initializers.values():
        match = _LAYER_NAME.search(value.name or "")
        if match is None:
            (prefix if current == -1 else tail).append(value)
            if current >= 0:
                current = layers
            continue
        k = int(match.group(1))
        if k < current or current == layers or k >= layers:
            raise NotReplicable(f"initializer {value.name} is out of the layer order")
        current = k
        blocks[k].append(value)
    return prefix, blocks, tail


def _over_n(x, y):
    """Samples of one node / value of the prefix or tail in both traces."""
    return [((0, SMALL), x), ((0, LARGE), y)]


def _over_middle(xs, ys):
    """Samples of one node / value of a middle layer (neither the first nor the last): layers
    1..SMALL-2 of the small trace, 1..LARGE-2 of the large one. Layer 0 is apart (its names
    lack some counters: ``node_cat`` vs ``node_cat_1``), and so is the last (its output has
    fewer users: the final norm instead of the next layer)."""
    return [*(((k, SMALL), xs[k]) for k in range(1, SMALL - 1)),
            *(((k, LARGE), ys[k]) for k in range(1, LARGE - 1))]


class _PerLayer:
    """Templates of the first, middle and last copies of something repeated per layer."""

    def __init__(self, copies_a: list[list], copies_b: list[list], make):
        self.first = self.middle = self.last = []
        if not copies_b:
            return
        if len(copies_a[0]) != len(copies_b[0]) or len(copies_a[-1]) != len(copies_b[-1]) or \
                len({len(c) for c in copies_a[1:-1] + copies_b[1:-1]}) > 1:
            raise NotReplicable(f"layers differ in size: {[len(c) for c in copies_b]}")
        self.first = [make(_over_n(x, y)) for x, y in zip(copies_a[0], copies_b[0])]
        self.last = [make(_over_n(x, y)) for x, y in zip(copies_a[-1], copies_b[-1])]
        self.middle = [make(_over_middle([c[i] for c in copies_a], [c[i] for c in copies_b]))
                       for i in range(len(copies_b[1]))]

    def at(self, k: int, n: int) -> tuple[list, int]:
        """The templates of layer k of n, and the k to emit them at."""
        if k == 0:
            return self.first, 0
        return (self.last, 0) if k == n - 1 else (self.middle, k)


def _kind(node: ir.Node):
    return node.domain, node.op_type, len(node.inputs), len(node.outputs)


def _split_prefix(mine: list[ir.Node], other: list[ir.Node], large: bool = False):
    """The prefix (before layer 0) as head, a run of a few nodes per layer, rest: the past's
    cache entries are made before the first layer (an Identity per past input)::

        small: head | c0 c1       | rest        large: head | c0 c1 c2 c3 | rest
    """
    small_nodes, large_nodes = (other, mine) if large else (mine, other)
    per, left = divmod(len(large_nodes) - len(small_nodes), LARGE - SMALL)
    if left:
        raise NotReplicable("the prefix does not grow by whole layers")
    if per == 0:
        return mine, [], []
    d = next((i for i, (x, y) in enumerate(zip(small_nodes, large_nodes)) if _kind(x) != _kind(y)),
             len(small_nodes))
    start = d - SMALL * per
    if start < 0:
        raise NotReplicable("the prefix's per-layer nodes are not one run")
    count = LARGE if large else SMALL
    runs = [mine[start + k * per:start + (k + 1) * per] for k in range(count)]
    rest = mine[start + count * per:]
    if any([_kind(n) for n in r] != [_kind(n) for n in runs[0]] for r in runs):
        raise NotReplicable("the prefix's per-layer nodes differ between layers")
    return mine[:start], runs, rest


def replicate(small: ir.Model, large: ir.Model, layers: int, parameters: dict,
              say: Say | None = None) -> ir.Model:
    """The ``layers``-layer graph from traces of :data:`SMALL` and :data:`LARGE` layers.
    ``parameters``: the N-layer model's ``named_parameters`` (their empty tensors become the
    initializers' placeholders, as in a full trace)."""
    from torch.onnx._internal.exporter._core import TorchTensor

    say = say or (lambda _m: None)
    a, b = _sections(small, SMALL), _sections(large, LARGE)
    if any(not block for block in a.layers + b.layers):
        raise NotReplicable("a layer has no node in a template trace")
    if len(a.tail) != len(b.tail):
        raise NotReplicable("the nodes after the last layer differ between the traces")
    head_a, group_a, rest_a = _split_prefix(a.prefix, b.prefix)
    head_b, group_b, rest_b = _split_prefix(b.prefix, a.prefix, large=True)
    prefix_nodes = [_NodeTemplate(_over_n(x, y)) for x, y in zip(head_a, head_b)]
    group_nodes = _PerLayer(group_a, group_b, _NodeTemplate)
    rest_nodes = [_NodeTemplate(_over_n(x, y)) for x, y in zip(rest_a, rest_b)]
    layer_nodes = _PerLayer(a.layers, b.layers, _NodeTemplate)
    tail_nodes = [_NodeTemplate(_over_n(x, y)) for x, y in zip(a.tail, b.tail)]

    # graph inputs: input_ids, attention_mask, position_ids, then the past per layer
    inputs_b = [v.name for v in large.graph.inputs]
    fixed = inputs_b[:len(inputs_b) - 2 * LARGE]
    if inputs_b != fixed + past_names(LARGE) or \
            [v.name for v in large.graph.outputs] != ["logits", *present_names(LARGE)]:
        raise NotReplicable(f"unexpected graph inputs / outputs {inputs_b}")
    values: dict[str, ir.Value] = {}
    graph_inputs = []
    by_name = {v.name: v for v in large.graph.inputs}
    templates = fixed + [name for k in range(layers)
                         for name in past_names(LARGE)[2 * min(k, LARGE - 1):][:2]]
    for name, template in zip(fixed + past_names(layers), templates, strict=True):
        graph_inputs.append(_copy_value(by_name[template], name))
        values[name] = graph_inputs[-1]

    pa, la, ta = _layer_inits(small, SMALL)
    pb, lb, tb = _layer_inits(large, LARGE)
    if len(pa) != len(pb) or len(ta) != len(tb):
        raise NotReplicable("the template traces' initializers differ")

    initializers = []

    def init_template(samples: list[tuple[tuple[int, int], ir.Value]]):
        return fit([(p, v.name) for p, v in samples]), samples

    def add_init(template, k: int) -> None:
        name_at, samples = template
        name = name_at(k, layers)
        old = samples[-1][1]
        value = _copy_value(old, name)
        param = parameters.get(name.removeprefix("model."))
        if name.startswith("model.") and param is not None:
            if tuple(param.shape) != tuple(old.shape):
                raise NotReplicable(f"{name}: the model's shape differs from the template's")
            value.const_value = TorchTensor(param, name=name)
        else:  # a constant of the trace (lifted tensor, buffer): the same in every copy
            if any(v.const_value.tobytes() != old.const_value.tobytes() for _, v in samples):
                raise NotReplicable(f"constant {name} differs between layers")
            value.const_value = old.const_value
        values[name] = value
        initializers.append(value)

    for x, y in zip(pa, pb):
        add_init(init_template(_over_n(x, y)), 0)
    layer_inits = _PerLayer(la, lb, init_template)
    for k in range(layers):
        templates, at = layer_inits.at(k, layers)
        for t in templates:
            add_init(t, at)
    for x, y in zip(ta, tb):
        add_init(init_template(_over_n(x, y)), 0)

    nodes = [t.emit(0, layers, values) for t in prefix_nodes]
    for k in range(layers):  # the prefix's nodes per layer (the past's cache entries)
        templates, at = group_nodes.at(k, layers)
        nodes += [t.emit(at, layers, values) for t in templates]
    nodes += [t.emit(0, layers, values) for t in rest_nodes]
    for k in range(layers):
        templates, at = layer_nodes.at(k, layers)
        nodes += [t.emit(at, layers, values) for t in templates]
        if k % 4 == 3 or k == layers - 1:
            say(f"tracing: layer {k + 1}/{layers} replicated")
    nodes += [t.emit(0, layers, values) for t in tail_nodes]

    out_names = ["logits", *present_names(layers)]
    missing = [n for n in out_names if n not in values]
    if missing:
        raise NotReplicable(f"no node gives the graph outputs {missing[:3]}")
    graph = ir.Graph(graph_inputs, [values[n] for n in out_names], nodes=nodes,
                     initializers=initializers, doc_string=large.graph.doc_string,
                     opset_imports=dict(large.graph.opset_imports), name=large.graph.name,
                     metadata_props=dict(large.graph.metadata_props))
    reset_name_counters(graph)
    return ir.Model(graph, ir_version=large.ir_version, producer_name=large.producer_name,
                    producer_version=large.producer_version, domain=large.domain,
                    model_version=large.model_version, doc_string=large.doc_string,
                    functions=list(large.functions.values()),
                    metadata_props=dict(large.metadata_props))


@contextlib.contextmanager
def one_registry():
    """Build torch.onnx's registry of ONNX translations once for several traces: every
    ``torch.onnx.export`` call builds it again (``ONNXRegistry.from_torchlib``: 4 s here after
    the first, at load 17). Nothing when torch moves it (the traces then pay it each)."""
    try:
        from torch.onnx._internal.exporter import _registration

        cls = _registration.ONNXRegistry
        original = cls.__dict__["from_torchlib"]
    except (ImportError, AttributeError, KeyError):
        yield
        return
    build = original.__get__(None, cls)
    cache: dict[str, object] = {}

    def cached(*args, **kwargs):
        key = repr((args, sorted(kwargs.items())))
        if key not in cache:
            cache[key] = build(*args, **kwargs)
        return cache[key]

    cls.from_torchlib = staticmethod(cached)
    try:
        yield
    finally:
        cls.from_torchlib = original


def uniform_layers(config) -> bool:
    """Every decoder layer is of one kind (Gemma 3's sliding / full alternation is not)."""
    kinds = getattr(config, "layer_types", None)
    return not kinds or len(set(kinds)) == 1


def _config_with_layers(config, layers: int):
    small = copy.deepcopy(config)
    small.num_hidden_layers = layers
    if getattr(small, "layer_types", None):
        small.layer_types = list(small.layer_types)[:layers]
    return small


def trace_template(model, spec: type[ArchitectureSpec], *, opset: int = DEFAULT_OPSET,
                   say: Say | None = None, min_layers: int = MIN_LAYERS):
    """Trace ``model`` (empty parameters: streaming export) through two small traces of its
    config and :func:`replicate`. Returns (ir.Model, inputs, outputs). Raises NotReplicable
    when the model is not uniform or the traces do not determine the graph."""
    from .lazy_weights import empty_model

    say = say or (lambda _m: None)
    layers = spec.kv_layout(model.config)[0]
    if not uniform_layers(model.config):
        raise NotReplicable(f"layers of several kinds: {sorted(set(model.config.layer_types))}")
    if layers < max(min_layers, LARGE + 1):
        raise NotReplicable(f"{layers} layers: below {max(min_layers, LARGE + 1)} the whole "
                            "trace is about as fast")
    dtype = next(model.parameters()).dtype
    traces = []
    with one_registry():
        for count in (SMALL, LARGE):
            say(f"tracing a {count}-layer copy of the model (of {layers} layers)")
            small = empty_model(_config_with_layers(model.config, count), dtype)
            graph, _, _ = trace_decoder(small, spec, opset=opset)
            traces.append(graph)
            del small
    params = dict(model.named_parameters(remove_duplicate=False))
    graph = replicate(traces[0], traces[1], layers, params, say)
    inputs = [v.name for v in graph.graph.inputs]
    outputs = [v.name for v in graph.graph.outputs]
    return graph, inputs, outputs
