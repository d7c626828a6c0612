"""A trace as a function of its layer count: the symbolic-dimension ``Shape`` nodes read fixed
inputs, nodes and values are named by position, torch's FX debug records are dropped.

``onnx_export.trace_decoder`` applies it to every trace; ``layer_template`` relies on it to
replicate small traces into the full one (its own module so the two do not import each other).
"""

from __future__ import annotations

import onnx_ir as ir

_SCOPES = "pkg.torch.onnx.name_scopes"

#: metadata torch.onnx writes that names torch.export's FX nodes (``%sym_size_int_63``,
#: ``num_users=29``): debug text whose numbers are not a function of the layer count
FX_RECORDS = ("namespace", "pkg.torch.onnx.fx_node")


def canonical_trace(model: ir.Model, sources: dict[str, tuple[str, int]]) -> None:
    """Make a trace a function of its layer count: torch.export reads each symbolic dimension
    (batch, past length) from an input it picks differently per layer count (Llama, 3 layers:
    the batch from ``attention_mask``; 5 layers: from ``past_key_values.4.key``; 9 layers:
    ``past_key_values.8.key``), and its FX and ONNX name counters follow that choice. So:
    every ``Shape`` of one symbolic dimension of a graph input reads ``sources[dim name]``
    (input, axis) instead; nodes and values (graph inputs, outputs and initializers aside) are
    named by position (``{op}_{i}``, ``v{i}``), the last module scope with them; FX records
    are dropped. The graph computes the same (the inputs share those dimensions by the
    export's dynamic shapes)."""
    graph = model.graph
    inputs = {v.name: v for v in graph.inputs}
    for node in graph:
        if node.op_type != "Shape" or node.domain != "" or node.inputs[0] is None or \
                node.inputs[0].name not in inputs:
            continue
        start, end = node.attributes.get("start"), node.attributes.get("end")
        shape = node.inputs[0].shape
        if start is None or end is None or end.value != start.value + 1 or shape is None:
            continue
        dim = shape[start.value]
        if not isinstance(dim, ir.SymbolicDim) or dim.value not in sources:
            continue
        name, axis = sources[dim.value]
        node.replace_input_with(0, inputs[name])
        node.attributes["start"] = ir.AttrInt64("start", axis)
        node.attributes["end"] = ir.AttrInt64("end", axis + 1)
        node.metadata_props["slmedge.symbolic_dim"] = dim.value
    # the run of those Shape (+ Squeeze) nodes that opens the graph, in the sources' order
    order = list(sources)
    head: list[list[ir.Node]] = []
    for node in graph:
        if "slmedge.symbolic_dim" in node.metadata_props:
            head.append([node])
        elif head and node.op_type == "Squeeze" and node.inputs[0] is head[-1][0].outputs[0] \
                and len(head[-1]) == 1:
            head[-1].append(node)
        else:
            break
    if len(head) > 1:
        rest = next(n for n in graph if all(n is not m for run in head for m in run))
        flat = [n for run in head for n in run]
        graph.remove(flat)
        head.sort(key=lambda run: order.index(run[0].metadata_props["slmedge.symbolic_dim"]))
        graph.insert_before(rest, [n for run in head for n in run])
    for run in head:
        run[0].metadata_props.pop("slmedge.symbolic_dim")
    keep = {v.name for v in graph.inputs} | {v.name for v in graph.outputs} | \
        set(graph.initializers)
    count = 0
    for i, node in enumerate(graph):
        node.name = f"{node.op_type}_{i}"
        for key in FX_RECORDS:
            node.metadata_props.pop(key, None)
        scopes = node.metadata_props.get(_SCOPES)
        if scopes and scopes.endswith("']"):
            node.metadata_props[_SCOPES] = scopes[:scopes.rindex("'", 0, -2) + 1] + \
                node.name + "']"
        for value in node.outputs:
            if value.name not in keep:
                value.name = f"v{count}"
                count += 1
    reset_name_counters(graph)


def reset_name_counters(graph: ir.Graph) -> None:
    """Start the graph's ``val_{i}`` / ``node_{op}_{i}`` counters (onnx_ir's name authority:
    the passes name what they add with it) at 0 with the graph's present names taken: the
    tracer left them at its own count (``val_1349`` in a 7-layer tiny Llama), which a
    replicated graph does not know."""
    authority = getattr(graph, "_name_authority", None)
    if authority is None or not hasattr(authority, "_value_counter"):
        return
    authority._value_counter = authority._node_counter = 0
    authority._value_names = {v.name for v in graph.inputs} | set(graph.initializers) | \
        {v.name for n in graph for v in n.outputs}
    authority._node_names = {n.name for n in graph}
