"""What a decoder graph holds, as quantization needs to know it.

Finds the weight MatMuls (constant ``B``) with their decoder layer and module name, the
``lm_head`` (the weight MatMul that produces ``logits``), the embedding ``Gather``, the
activation-by-activation MatMuls of attention, and the *mask path*: every node that the
``attention_mask`` input reaches before a ``Softmax`` (mask arithmetic, the ``Add`` of
the -3.4e38 mask to the scores, the Softmax itself). Module names come from the
``pkg.torch.onnx.name_scopes`` metadata that ``torch.onnx.export(dynamo=True)`` writes
on every node; graphs without it still work, only without layer numbers.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

_LAYER_RE = re.compile(r"\.(?:layers|h|blocks)\.(\d+)(?:\.|$)")
#: HF module names of MLP input projections (Llama/Qwen/Gemma, Phi-3, GPT-2, OPT, NeoX)
MLP_INPUT_MODULES = frozenset({"gate_proj", "up_proj", "gate_up_proj", "c_fc", "fc1",
                               "dense_h_to_4h", "w1", "w3"})
#: Ops through which the logits may pass after the lm_head MatMul (Gemma's soft-capping,
#: casts of fp16 graphs, reshapes).
_LOGIT_PASSTHROUGH = {"Cast", "Reshape", "Mul", "Div", "Tanh", "Add", "Identity", "Squeeze"}


@dataclass(frozen=True)
class WeightMatMul:
    """A MatMul whose second input is a constant ``[K, N]`` weight."""

    node: str
    weight: str
    k: int
    n: int
    layer: int | None
    module: str  # e.g. "model.layers.3.mlp.down_proj", "" when unknown

    @property
    def params(self) -> int:
        return self.k * self.n

    @property
    def mlp_input(self) -> bool:
        """An MLP input projection (gate/up, also packed): the largest weights of a layer."""
        return self.module.rsplit(".", 1)[-1] in MLP_INPUT_MODULES

    @property
    def kinds(self) -> tuple[str, ...] | None:
        """The weight's roles (recipe.WeightKind values), several for a packed MatMul; None
        when unknown. An MLP input projection is gate and up: a packed gate/up MatMul keeps
        the module name of its first part (pack_matmuls.py)."""
        from .gguf_blocks import module_kinds

        return ("gate", "up") if self.mlp_input else module_kinds(self.module)


@dataclass
class GraphFacts:
    weight_matmuls: list[WeightMatMul] = field(default_factory=list)
    lm_head: str | None = None  # node name
    embedding_gathers: list[str] = field(default_factory=list)
    activation_matmuls: list[str] = field(default_factory=list)
    mask_path: set[str] = field(default_factory=set)
    num_layers: int = 0
    embedding_params: int = 0

    def layer_of(self, node: str) -> int | None:
        for w in self.weight_matmuls:
            if w.node == node:
                return w.layer
        return None

    def body_matmuls(self) -> list[WeightMatMul]:
        """Weight MatMuls other than the lm_head."""
        return [w for w in self.weight_matmuls if w.node != self.lm_head]


def name_scopes(node: onnx.NodeProto) -> list[str]:
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                value = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return []
            return [str(v) for v in value] if isinstance(value, list) else []
    return []


def _module_and_layer(node: onnx.NodeProto) -> tuple[str, int | None]:
    scopes = name_scopes(node)
    module = scopes[-2] if len(scopes) >= 2 else ""
    for scope in reversed(scopes):
        m = _LAYER_RE.search(scope + ".")
        if m:
            return module, int(m.group(1))
    # Nodes the fusion passes make carry no scopes but a name such as layers.3.attn.qkv_proj
    m = _LAYER_RE.search("." + node.name + ".")
    if m:
        return module or node.name, int(m.group(1))
    return module, None


def unique_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base_1``, ``base_2``, ... : the first not in ``taken`` (added to it)."""
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def constant_values(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Initializers and ``Constant`` node outputs of the main graph, by name."""
    consts = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = node.attribute[0].t
    return consts


def analyze(model: onnx.ModelProto) -> GraphFacts:
    """Collect the facts above from a decoder graph (weights are read only for their shapes)."""
    graph = model.graph
    consts = constant_values(model)
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)
    facts = GraphFacts()
    for n in graph.node:
        if n.op_type == "MatMul" and len(n.input) == 2:
            b = consts.get(n.input[1])
            if b is not None and len(b.dims) == 2:
                module, layer = _module_and_layer(n)
                facts.weight_matmuls.append(
                    WeightMatMul(n.name, n.input[1], int(b.dims[0]), int(b.dims[1]), layer, module)
                )
            elif b is None and n.input[0] not in consts:
                facts.activation_matmuls.append(n.name)
        elif n.op_type == "Gather" and n.input[0] in consts:
            table = consts[n.input[0]]
            if len(table.dims) == 2 and table.dims[0] > 1:
                facts.embedding_gathers.append(n.name)
                facts.embedding_params += int(np.prod(table.dims))
    facts.lm_head = _find_lm_head(graph, producer, consts)
    layers = [w.layer for w in facts.weight_matmuls if w.layer is not None]
    facts.num_layers = max(layers) + 1 if layers else 0
    facts.mask_path = _mask_path(graph, consumers)
    return facts


def _find_lm_head(graph, producer, consts) -> str | None:
    outputs = [o.name for o in graph.output if o.name == "logits"] or [graph.output[0].name]
    name, hops = outputs[0], 0
    while name in producer and hops < 8:
        node = producer[name]
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in consts:
            return node.name
        if node.op_type not in _LOGIT_PASSTHROUGH:
            return None
        dynamic = [i for i in node.input if i and i not in consts]
        if len(dynamic) != 1:
            return None
        name, hops = dynamic[0], hops + 1
    return None


# Ops whose inputs after the first are shapes, indices or sizes rather than data.
_SHAPE_ARGUMENT_OPS = frozenset({
    "Reshape", "Expand", "Slice", "Tile", "Pad", "Unsqueeze", "Squeeze", "ConstantOfShape",
    "Range", "Resize", "TopK", "Split", "ReduceMean", "ReduceSum", "ReduceMax",
})


def _mask_path(graph, consumers) -> set[str]:
    """Nodes reached from ``attention_mask``'s values (not its shape: a mask-derived size
    that reshapes o_proj's input does not make o_proj part of it), up to and including a
    Softmax."""
    seen: set[str] = set()
    frontier = [i.name for i in graph.input if i.name == "attention_mask"]
    visited_tensors: set[str] = set()
    while frontier:
        tensor = frontier.pop()
        if tensor in visited_tensors:
            continue
        visited_tensors.add(tensor)
        for node in consumers.get(tensor, []):
            if node.name in seen:
                continue
            if node.op_type in ("Shape", "Size") or (
                node.op_type in _SHAPE_ARGUMENT_OPS and tensor not in node.input[:1]
            ):
                continue  # the mask's shape, not its values: sizes other tensors
            seen.add(node.name)
            if node.op_type in ("Softmax", "MatMul", "MatMulNBits", "GroupQueryAttention",
                                "MultiHeadAttention", "Attention"):
                continue  # the mask ends here; what follows is ordinary activations
            frontier.extend(o for o in node.output if o)
    return seen


def split_gemms(model: onnx.ModelProto) -> int:
    """Rewrite ``Gemm(A, B, C)`` with constant 2-D ``B`` as ``MatMul`` + ``Add`` (in place).

    ONNX Runtime's weight-only quantizer handles MatMul only; GPT-2's projections export
    as Gemm. Returns how many were rewritten.
    """
    consts = {i.name: i for i in model.graph.initializer}
    new_nodes, count = [], 0
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        b = consts.get(node.input[1]) if node.op_type == "Gemm" and len(node.input) > 1 else None
        if (
            b is None or len(b.dims) != 2 or attrs.get("transA", 0)
            or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0
        ):
            new_nodes.append(node)
            continue
        weight = node.input[1]
        if attrs.get("transB", 0):
            arr = numpy_helper.to_array(b).T.copy()
            weight = node.input[1] + "_T"
            model.graph.initializer.append(numpy_helper.from_array(arr, weight))
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = node.output[0] + "_mm" if has_bias else node.output[0]
        mm = onnx.helper.make_node("MatMul", [node.input[0], weight], [mm_out], name=node.name + "_mm")
        mm.metadata_props.extend(node.metadata_props)
        new_nodes.append(mm)
        if has_bias:
            new_nodes.append(onnx.helper.make_node(
                "Add", [mm_out, node.input[2]], [node.output[0]], name=node.name + "_bias"))
        count += 1
    if count:
        del model.graph.node[:]
        model.graph.node.extend(new_nodes)
        used = {i for n in model.graph.node for i in n.input}
        keep = [i for i in model.graph.initializer if i.name in used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    return count


@dataclass
class TiedHeadOnce:
    """A tied float table stored once as ``[1, K, V]`` (passes/tied_head.py): read as ``B``
    by the lm_head MatMul(s) and by ``Gather(axis=2) -> Transpose(0,2,3,1) -> Squeeze(0)``
    for the embedding."""

    table: onnx.TensorProto
    matmuls: list[onnx.NodeProto]
    #: (Gather, Transpose, Squeeze) per embedding lookup
    lookups: list[tuple[onnx.NodeProto, onnx.NodeProto, onnx.NodeProto]]

    @property
    def rows_name(self) -> str:
        """The ``[V, K]`` table's name (the one the pass replaced: ``W`` of ``W_T``)."""
        name = self.table.name
        return name[:-2] if name.endswith("_T") else name + "_rows"


def find_tied_heads_once(model: onnx.ModelProto) -> list[TiedHeadOnce]:
    """The ``[1, K, V]`` tied tables of ``model`` (passes/tied_head.py's form)."""
    graph = model.graph
    consts = {i.name: i for i in graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in set(node.input):
            readers[name].append(node)
    outputs = {o.name for o in graph.output}
    found = []
    for table in graph.initializer:
        if len(table.dims) != 3 or table.dims[0] != 1 or table.name in outputs:
            continue
        matmuls, lookups, ok = [], [], True
        for node in readers.get(table.name, []):
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if node.op_type == "MatMul" and list(node.input).index(table.name) == 1 \
                    and node.input[0] != table.name:
                matmuls.append(node)
                continue
            if node.op_type != "Gather" or node.input[0] != table.name or attrs.get("axis") != 2:
                ok = False
                break
            chain = [node]
            for op, check in (("Transpose", lambda n, a: list(a.get("perm", [])) == [0, 2, 3, 1]),
                              ("Squeeze", lambda n, a: len(n.input) > 1 and n.input[1] in consts
                               and numpy_helper.to_array(consts[n.input[1]]).tolist() == [0])):
                users = readers.get(chain[-1].output[0], [])
                nxt = users[0] if len(users) == 1 else None
                if nxt is None or nxt.op_type != op or chain[-1].output[0] in outputs or not check(
                        nxt, {a.name: onnx.helper.get_attribute_value(a) for a in nxt.attribute}):
                    ok = False
                    break
                chain.append(nxt)
            if not ok:
                break
            lookups.append(tuple(chain))
        if ok and matmuls and lookups:
            found.append(TiedHeadOnce(table, matmuls, lookups))
    return found


def untie_head_once(model: onnx.ModelProto, head: TiedHeadOnce, rows: onnx.TensorProto,
                    columns: onnx.TensorProto) -> None:
    """Give a ``[1, K, V]`` tied table back the form quantization reads (in place): the
    MatMuls read ``columns`` (``[K, V]``, the table's own name, as :func:`fold_weight_transposes`
    names it) and each lookup is ``Gather(rows [V, K], ids)`` again, as exported."""
    graph = model.graph
    drop = {id(n) for _, t, s in head.lookups for n in (t, s)}
    for gather, _, squeeze in head.lookups:
        gather.input[0] = rows.name
        gather.output[0] = squeeze.output[0]
        for attr in list(gather.attribute):
            if attr.name == "axis":
                gather.attribute.remove(attr)
    keep = [n for n in graph.node if id(n) not in drop]
    del graph.node[:]
    graph.node.extend(keep)
    used = {i for n in graph.node for i in n.input}
    axes = {s.input[1] for _, _, s in head.lookups} - used
    # the exported order: the table where it was, its transpose appended (fold_weight_transposes)
    inits = [rows if t.name == head.table.name else t for t in graph.initializer
             if t.name not in axes]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    graph.initializer.append(columns)


def unchunk_tied_heads(model: onnx.ModelProto) -> int:
    """An fp16 tied head computed in vocabulary chunks (passes/tied_head.py
    ``Fp16TiedHeadChunks``: ``Cast(h)`` -> ``Loop`` of Slice / Cast / MatMul / Cast ->
    ``Transpose`` -> ``Reshape``) back to ``MatMul(h, W_T)`` on its ``[1, K, V]`` table, the form
    :func:`find_tied_heads_once` knows (in place, no tensor read: the same on placeholders).
    Returns how many heads were put back."""
    graph = model.graph
    consts = {i.name for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)
    count = 0
    for loop in [n for n in graph.node if n.op_type == "Loop"]:
        body = next((a.g for a in loop.attribute if a.name == "body"), None)
        slices = [n for n in body.node if n.op_type == "Slice" and n.input[0] in consts] \
            if body is not None else []
        matmuls = [n for n in body.node if n.op_type == "MatMul"] if body is not None else []
        if len(slices) != 1 or len(matmuls) != 1 or len(loop.output) != 1:
            continue
        cast_h = producer.get(matmuls[0].input[0])
        after = readers.get(loop.output[0], [])
        if cast_h is None or cast_h.op_type != "Cast" or len(after) != 1 \
                or after[0].op_type != "Transpose":
            continue
        reshape = readers.get(after[0].output[0], [])
        if len(reshape) != 1 or reshape[0].op_type != "Reshape":
            continue
        reshape = reshape[0]
        head = onnx.helper.make_node("MatMul", [cast_h.input[0], slices[0].input[0]],
                                     [reshape.output[0]], name=loop.name.removesuffix("/loop"))
        head.metadata_props.extend(loop.metadata_props)
        index = list(graph.node).index(reshape)
        graph.node.insert(index, head)
        gone = [loop, after[0], reshape] + ([cast_h] if not readers.get(cast_h.output[0]) else [])
        for node in gone:
            graph.node.remove(node)
        count += 1
    if count:  # the chunks' own constants (count, sizes, axes) are read by nothing now
        drop_unused_initializers(model)
    return count


def _reads(graph: onnx.GraphProto) -> set[str]:
    """The names ``graph``'s nodes read, those of their subgraphs (Loop / If bodies) too."""
    used = set()
    for node in graph.node:
        used.update(node.input)
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                used |= _reads(sub)
    return used


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    """Initializers nothing reads (no node, no subgraph's node, no graph output) leave the
    graph (as ORT's quantizer's clean_initializers)."""
    graph = model.graph
    used = _reads(graph) | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


def fold_weight_transposes(model: onnx.ModelProto) -> int:
    """Give ``MatMul(x, Transpose(W))`` its own constant ``W.T`` (in place).

    Tied embeddings export as ``lm_head = MatMul(h, Transpose(embed_tokens.weight))``; ORT
    folds that at load time, but the quantizers only see constant ``B`` inputs, so the
    lm_head would stay fp32. Returns how many MatMuls now read a folded weight.

    A table the exporter stored once as ``[1, K, V]`` (passes/tied_head.py) becomes the same
    two constants: ``W.T`` for the MatMuls, ``W`` for the embedding ``Gather`` (an fp16 head
    computed in vocabulary chunks is put back first: :func:`unchunk_tied_heads`).
    """
    unchunk_tied_heads(model)
    untied = 0
    for head in find_tied_heads_once(model):
        arr = numpy_helper.to_array(head.table)
        columns = numpy_helper.from_array(arr.reshape(arr.shape[1:]), head.table.name)
        rows = numpy_helper.from_array(np.ascontiguousarray(arr[0].T), head.rows_name)
        untie_head_once(model, head, rows, columns)
        untied += len(head.matmuls)
    consts = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    folded: dict[str, str] = {}
    count = 0
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2:
            continue
        t = producer.get(node.input[1])
        if t is None or t.op_type != "Transpose" or t.input[0] not in consts:
            continue
        perm = [list(a.ints) for a in t.attribute if a.name == "perm"]
        if len(consts[t.input[0]].dims) != 2 or (perm and perm[0] != [1, 0]):
            continue
        if t.output[0] not in folded:
            name = t.input[0] + "_T"
            arr = numpy_helper.to_array(consts[t.input[0]]).T.copy()
            model.graph.initializer.append(numpy_helper.from_array(arr, name))
            folded[t.output[0]] = name
        node.input[1] = folded[t.output[0]]
        count += 1
    if count:
        used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
        keep = [n for n in model.graph.node
                if not (n.op_type == "Transpose" and n.output[0] in folded and n.output[0] not in used)]
        del model.graph.node[:]
        model.graph.node.extend(keep)
    return count + untied
