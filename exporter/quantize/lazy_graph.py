"""The quantizer's graph preparation without the weights in memory.

:func:`core.quantize_model` prepares a graph before quantizing it: ``Gemm`` -> ``MatMul`` +
``Add`` (:func:`graph.split_gemms`), ``MatMul(x, Transpose(W))`` -> a constant ``W.T``
(:func:`graph.fold_weight_transposes`), MatMuls reading one input packed side by side
(:func:`pack_matmuls.pack_shared_input_matmuls`). Those work on a model whose weights are
loaded. Here the same rewrites act on a graph loaded without its external data: each new
weight is a *placeholder* initializer (name, type, shape, no data) with a recipe in
:class:`LazyWeights` (transpose of, concatenation of) that computes its values from the
sources when it is written, one tensor at a time. Node and initializer names, node order
and shapes are the same as the in-memory functions give (tests/unit/quantize/
test_streaming_quant.py compares them), so everything downstream sees the same graph.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from .external_data import TensorSource
from .graph import (_module_and_layer, drop_unused_initializers, find_tied_heads_once,
                    unchunk_tied_heads, untie_head_once)
from .pack_matmuls import pack_shared_input_matmuls as _pack


class LazyWeights:
    """Values of the graph's initializers by name: sources read on demand, derived ones
    computed on demand. Keeps references to the source initializers even after the graph
    drops them (a derived weight still reads them)."""

    def __init__(self, model: onnx.ModelProto, source: TensorSource):
        self.source = source
        self.protos: dict[str, TensorProto] = {t.name: t for t in model.graph.initializer}
        self.recipes: dict[str, Callable[[], np.ndarray]] = {}
        #: packed weight -> the modules whose weights it concatenates along N, in order
        self.parts: dict[str, list[str]] = {}

    def placeholder(self, name: str, dims, data_type: int,
                    recipe: Callable[[], np.ndarray]) -> TensorProto:
        tensor = TensorProto(name=name, dims=list(dims), data_type=data_type)
        self.recipes[name] = recipe
        self.protos[name] = tensor
        return tensor

    def is_placeholder(self, name: str) -> bool:
        return name in self.recipes

    def array(self, name: str) -> np.ndarray:
        if name in self.recipes:
            return self.recipes[name]()
        return self.source.read(self.protos[name])

    def forget(self, name: str) -> None:
        """Drop a source nothing will read again (its inline bytes can be freed)."""
        if name not in self.recipes:
            self.protos.pop(name, None)


def split_gemms(model: onnx.ModelProto, lazy: LazyWeights) -> int:
    """:func:`graph.split_gemms` on placeholders: a transposed ``B`` is a recipe."""
    graph = model.graph
    consts = {i.name: i for i in graph.initializer}
    new_nodes, count = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        b = consts.get(node.input[1]) if node.op_type == "Gemm" and len(node.input) > 1 else None
        if (
            b is None or len(b.dims) != 2 or attrs.get("transA", 0)
            or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0
        ):
            new_nodes.append(node)
            continue
        weight = node.input[1]
        if attrs.get("transB", 0):
            src = node.input[1]
            weight = src + "_T"
            graph.initializer.append(lazy.placeholder(
                weight, [b.dims[1], b.dims[0]], b.data_type,
                lambda s=src: lazy.array(s).T))  # a view: readers copy what they need
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = node.output[0] + "_mm" if has_bias else node.output[0]
        mm = helper.make_node("MatMul", [node.input[0], weight], [mm_out], name=node.name + "_mm")
        mm.metadata_props.extend(node.metadata_props)
        new_nodes.append(mm)
        if has_bias:
            new_nodes.append(helper.make_node(
                "Add", [mm_out, node.input[2]], [node.output[0]], name=node.name + "_bias"))
        count += 1
    if count:
        del graph.node[:]
        graph.node.extend(new_nodes)
        drop_unused_initializers(model)
    return count


def fold_weight_transposes(model: onnx.ModelProto, lazy: LazyWeights) -> int:
    """:func:`graph.fold_weight_transposes` on placeholders (the tied ``lm_head``'s ``W.T``;
    a ``[1, K, V]`` table stored once becomes ``W.T`` and ``W`` placeholders; an fp16 head in
    vocabulary chunks is put back first: :func:`graph.unchunk_tied_heads`)."""
    unchunk_tied_heads(model)
    untied = 0
    for head in find_tied_heads_once(model):
        name, (_, k, v), dtype = head.table.name, head.table.dims, head.table.data_type
        if lazy.is_placeholder(name):
            whole = lazy.recipes[name]
        else:
            whole = (lambda t=lazy.protos[name]: lazy.source.read(t))
        columns = lazy.placeholder(name, [k, v], dtype, lambda f=whole, s=(k, v): f().reshape(s))
        rows = lazy.placeholder(head.rows_name, [v, k], dtype,
                                lambda f=whole, s=(k, v): f().reshape(s).T)  # a view, as below
        untie_head_once(model, head, rows, columns)
        untied += len(head.matmuls)
    graph = model.graph
    consts = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    folded: dict[str, str] = {}
    count = 0
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2:
            continue
        t = producer.get(node.input[1])
        if t is None or t.op_type != "Transpose" or t.input[0] not in consts:
            continue
        perm = [list(a.ints) for a in t.attribute if a.name == "perm"]
        table = consts[t.input[0]]
        if len(table.dims) != 2 or (perm and perm[0] != [1, 0]):
            continue
        if t.output[0] not in folded:
            name = t.input[0] + "_T"
            graph.initializer.append(lazy.placeholder(
                name, [table.dims[1], table.dims[0]], table.data_type,
                lambda s=t.input[0]: lazy.array(s).T))  # a view, as above
            folded[t.output[0]] = name
        node.input[1] = folded[t.output[0]]
        count += 1
    if count:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        keep = [n for n in graph.node
                if not (n.op_type == "Transpose" and n.output[0] in folded and n.output[0] not in used)]
        del graph.node[:]
        graph.node.extend(keep)
    return count + untied


def pack_shared_input_matmuls(model: onnx.ModelProto, lazy: LazyWeights) -> list[str]:
    """:func:`pack_matmuls.pack_shared_input_matmuls` on placeholders: the packed ``[K, N1 +
    N2]`` weight is a concatenation computed when written."""

    def placeholder(wname: str, nodes: list[onnx.NodeProto],
                    inits: dict[str, onnx.TensorProto]) -> onnx.TensorProto:
        parts = tuple(n.input[1] for n in nodes)
        k = int(inits[parts[0]].dims[0])
        width = sum(int(inits[p].dims[1]) for p in parts)
        lazy.parts[wname] = [_module_and_layer(n)[0] for n in nodes]
        return lazy.placeholder(
            wname, [k, width], inits[parts[0]].data_type,
            lambda ps=parts: np.concatenate([lazy.array(p) for p in ps], axis=1))

    return _pack(model, pack_weights=placeholder)
