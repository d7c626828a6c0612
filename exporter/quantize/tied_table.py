"""One int4 table for a tied embedding and ``lm_head``.

With tied embeddings and both the ``lm_head`` and the embedding at int4, ONNX Runtime's
quantizer writes the table twice: ``MatMulNBits`` weights ``[vocab, K / bs, bs / 2]`` (uint8,
two 4-bit values a byte, zero point 8) for the ``lm_head`` and an int4 ``[vocab, K]`` table
for ``GatherBlockQuantized``. When the two hold the same values (symmetric RTN of the same
block size quantizes the same rows the same way) and the same scales, the lookup can read
the ``lm_head``'s bytes through a ``Reshape`` to ``[vocab, K / 2]`` (``GatherBlockQuantized``
with ``bits=4`` over uint8 data takes 8 as its zero point, as ``MatMulNBits`` does), the
layout ONNX Runtime GenAI's builder writes. SmolLM2-135M: 18 MB less of 104.5.

Only byte-identical tables are shared, so the graph computes exactly what it did.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _as_mnb_bytes(table: np.ndarray) -> np.ndarray:
    """A signed int4 ``[vocab, K]`` table as MatMulNBits' packed uint8 ``[vocab, K / 2]``."""
    u = (table.astype(np.int16) + 8).astype(np.uint8)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8)


def share_tied_int4_table(model: onnx.ModelProto) -> list[str]:
    """Point each ``GatherBlockQuantized`` whose int4 table equals an int4 ``MatMulNBits``'s
    weights at those weights (in place); returns the rewritten lookups' names."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    heads = []
    for node in graph.node:
        if node.op_type != "MatMulNBits" or len(node.input) > 3 and any(node.input[3:]):
            continue  # zero points, g_idx or bias: not the plain symmetric layout
        a = _attrs(node)
        if a.get("bits") != 4 or node.input[1] not in inits or node.input[2] not in inits:
            continue
        heads.append((node, a))
    if not heads:
        return []
    shared, dropped = [], set()
    for node in graph.node:
        if node.op_type != "GatherBlockQuantized" or len(node.input) != 3:
            continue
        a = _attrs(node)
        data, scales = inits.get(node.input[0]), inits.get(node.input[2])
        if (data is None or scales is None or data.data_type != TensorProto.INT4
                or a.get("gather_axis", 0) != 0 or a.get("quantize_axis", 1) != 1
                or len(data.dims) != 2):
            continue
        vocab, k = data.dims
        for head, ha in heads:
            if ha["N"] != vocab or ha["K"] != k or ha["block_size"] != a.get("block_size", 128):
                continue
            h_data, h_scales = inits[head.input[1]], inits[head.input[2]]
            if scales.data_type != h_scales.data_type:
                continue
            s_own = numpy_helper.to_array(scales).reshape(-1)
            s_head = numpy_helper.to_array(h_scales).reshape(-1)
            if s_own.shape != s_head.shape or not np.array_equal(s_own, s_head):
                continue
            packed = numpy_helper.to_array(h_data).reshape(vocab, -1)
            if not np.array_equal(_as_mnb_bytes(numpy_helper.to_array(data)), packed):
                continue
            base = node.name or node.output[0]
            shape = numpy_helper.from_array(np.array([vocab, k // 2], np.int64), f"{base}/tied_shape")
            graph.initializer.append(shape)
            table = f"{base}/tied_table"
            reshape = helper.make_node("Reshape", [head.input[1], shape.name], [table],
                                       name=f"{base}/tied_reshape")
            scale_in = head.input[2]
            if list(h_scales.dims) != [vocab, int(np.ceil(k / ha["block_size"]))]:
                s_shape = numpy_helper.from_array(
                    np.array([vocab, -1], np.int64), f"{base}/tied_scale_shape")
                graph.initializer.append(s_shape)
                scale_in = f"{base}/tied_scales"
                graph.node.insert(0, helper.make_node("Reshape", [head.input[2], s_shape.name],
                                                      [scale_in], name=scale_in))
            graph.node.insert(0, reshape)
            dropped |= {node.input[0], node.input[2]}
            node.input[0], node.input[2] = table, scale_in
            for attr in list(node.attribute):
                if attr.name == "bits":
                    node.attribute.remove(attr)
            node.attribute.append(helper.make_attribute("bits", 4))
            shared.append(node.name)
            break
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name not in dropped or t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return shared


#: a tied table with at least this many values gets its lookup from the lm_head's quantized
#: table by default (QuantRecipe.tied_table): Qwen2.5-0.5B's 151936 x 896 (136M) yes,
#: SmolLM2-135M's 49152 x 576 (28M) no
TIED_TABLE_MIN_VALUES = 1 << 26


def tied_gathers(model: onnx.ModelProto, gathers: list[str], head: str | None,
                 same: Callable[[str, str], bool]) -> list[str]:
    """The embedding ``Gather`` nodes of at least ``TIED_TABLE_MIN_VALUES`` values whose
    ``[V, K]`` table is the ``lm_head``'s ``[K, V]`` weight transposed: ``same(table,
    weight)`` says whether the values are (the exporter may store a tied table twice: a
    folded ``Transpose``)."""
    if head is None:
        return []
    node = {n.name: n for n in model.graph.node}
    inits = {t.name: t for t in model.graph.initializer}
    h = node.get(head)
    if h is None or h.input[1] not in inits:
        return []
    weight = inits[h.input[1]]
    found = []
    for g in gathers:
        gather = node.get(g)
        if gather is None or gather.input[0] not in inits:
            continue
        table = inits[gather.input[0]]
        if (len(table.dims) == 2 and list(weight.dims) == list(table.dims)[::-1]
                and table.data_type == weight.data_type
                and int(np.prod(table.dims)) >= TIED_TABLE_MIN_VALUES
                and same(gather.input[0], h.input[1])):
            found.append(g)
    return found


def share_tied_nbits_table(model: onnx.ModelProto, gather: str, head_output: str) -> bool:
    """The ``Gather`` named ``gather`` becomes a lookup (8 bits: plain ``Gather`` nodes, 4 bits:
    a ``GatherBlockQuantized``) reading the 8-bit or 4-bit ``MatMulNBits`` that produces
    ``head_output`` (the tied ``lm_head``: its ``[N, K]`` weight is the table): its bytes,
    scales and integer zero points, no second table. The lookup gives the rows the ``lm_head`` computes with
    (dequantized exactly as ``MatMulNBits`` does: ``GatherBlockQuantized`` with ``bits=4``
    over uint8 data reads two values a byte, low nibble first, and packed 4-bit zero points,
    8 when there are none, as ``MatMulNBits`` does; checked against ORT 1.32's kernels).
    Returns False (graph unchanged) when the head is not such a node (float zero points:
    HQQ's, folded later; a ``g_idx``; a 4-bit head with an odd number of blocks per row,
    whose packed zero points would straddle rows).

    An 8-bit table is read as the head stores it, ``[N, K / bs, bs]``, with its scales and
    zero points, by plain ``Gather`` nodes (:func:`_gather_blocks`), not through a
    ``Reshape`` of the table: ONNX Runtime constant-folds a ``Reshape`` of an initializer
    into a new tensor, so the session held the table twice (that copy, and ``MatMulNBits``'
    pre-packed one); read directly, the lookup's inputs are the file's own bytes,
    memory-mapped from ``model.onnx.data`` (Gemma 3 270M int4: 168 MB less after load with
    the runtime's ``release_mapped_weights``; the scales' and zero points' Reshapes, another
    21-26 MB, went on 2026-12-07). A 4-bit table is read the same way, its nibbles unpacked
    after the Gather (until 2026-12-08 it went through ``Reshape`` nodes to
    ``GatherBlockQuantized``'s layout, which ORT folded into private copies: 87 MB at
    Qwen2.5-0.5B's shapes with ``--large-table-bits 4``)."""
    graph = model.graph
    head = next((n for n in graph.node if n.op_type == "MatMulNBits"
                 and n.output[0] == head_output), None)
    node = next((n for n in graph.node if n.name == gather and n.op_type == "Gather"), None)
    if head is None or node is None:
        return False
    a = _attrs(head)
    axis = next((x.i for x in node.attribute if x.name == "axis"), 0)
    bits = a.get("bits")
    if bits not in (4, 8) or a["K"] % a["block_size"] or axis != 0 or (
            len(head.input) > 4 and any(head.input[4:])):
        return False
    n, k, bs = a["N"], a["K"], a["block_size"]
    zero_points = head.input[3] if len(head.input) > 3 and head.input[3] else None
    if zero_points is not None:
        zp = next((t for t in graph.initializer if t.name == zero_points), None)
        if zp is None or zp.data_type != TensorProto.UINT8:
            return False  # float zero points (HQQ) are folded into a correction later
    if bits == 4 and zero_points is not None and (k // bs) % 2:
        return False
    base = node.name or node.output[0]
    table = next((t for t in graph.initializer if t.name == head.input[1]), None)
    rank = _rank(graph, node.input[1])
    if rank and table is not None and list(table.dims) == [n, k // bs, bs * bits // 8]:
        _gather_blocks(model, node, head, rank)
        return True
    # a table not in MatMulNBits' [N, K / bs, bs * bits / 8] layout or ids of unknown rank: a
    # GatherBlockQuantized through Reshapes (two values a byte at 4 bits, so a row of the table
    # is k / 2 bytes, and blocks / 2 of packed zero points)
    table_shape = numpy_helper.from_array(np.array([n, k * bits // 8], np.int64),
                                          f"{base}/tied_shape")
    block_shape = numpy_helper.from_array(np.array([n, k // bs], np.int64), f"{base}/tied_block_shape")
    graph.initializer.extend([table_shape, block_shape])
    zp_shape = block_shape.name
    if bits == 4 and zero_points is not None:
        packed = numpy_helper.from_array(np.array([n, k // bs // 2], np.int64),
                                         f"{base}/tied_zero_point_shape")
        graph.initializer.append(packed)
        zp_shape = packed.name
    inputs = [f"{base}/tied_table", node.input[1], f"{base}/tied_scales"]
    reshapes = [helper.make_node("Reshape", [head.input[1], table_shape.name], [inputs[0]],
                                 name=f"{base}/tied_reshape"),
                helper.make_node("Reshape", [head.input[2], block_shape.name], [inputs[2]],
                                 name=f"{base}/tied_scales_reshape")]
    if len(head.input) > 3 and head.input[3]:
        inputs.append(f"{base}/tied_zero_points")
        reshapes.append(helper.make_node("Reshape", [head.input[3], zp_shape],
                                         [inputs[3]], name=f"{base}/tied_zero_points_reshape"))
    gbq = helper.make_node("GatherBlockQuantized", inputs, list(node.output), name=node.name,
                           domain="com.microsoft", gather_axis=0, quantize_axis=1,
                           block_size=bs, bits=bits)
    gbq.metadata_props.extend(node.metadata_props)
    idx = list(graph.node).index(node)
    graph.node.remove(node)
    graph.node.insert(idx, gbq)
    for r in reversed(reshapes):
        graph.node.insert(0, r)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return True


def _rank(graph, name: str) -> int | None:
    """The rank of graph input or value ``name`` when the graph states it."""
    for v in [*graph.input, *graph.value_info]:
        if v.name == name and v.type.tensor_type.HasField("shape"):
            return len(v.type.tensor_type.shape.dim)
    return None


def _gather_blocks(model: onnx.ModelProto, node: onnx.NodeProto, head: onnx.NodeProto,
                   rank: int) -> None:
    """``node`` (a ``Gather`` of ``rank``-D indices) becomes a lookup of the 8-bit or 4-bit
    head's ``[N, K / bs, bs * bits / 8]`` bytes, ``[N, K / bs]`` scales and zero points
    (``[N, ceil(K / bs / 2)]`` packed at 4 bits) as they are stored, dequantized as
    ``MatMulNBits`` does (``(q - zp) * scale``, zp 128 / 8 when there are none). At 4 bits
    the gathered bytes and zero points are unpacked, low nibble first
    (``BitwiseAnd 15``, ``BitShift`` right by 4, interleaved by ``Concat`` + ``Reshape``)::

        head bytes [N, nb, bs] u8 --+--------------------------------------> MatMulNBits
        scales [N, nb] -------------+--------------------------------------> (lm_head)
        zero points [N, nb] u8 -----+-------------------------------------->
                                    |
        input_ids [..] --> Gather(bytes) [.., nb, bs] -> Cast ----------------.
                      \--> Gather(zero points) [.., nb] -> Cast -> Unsqueeze -> Sub
                       \-> Gather(scales) [.., nb] ---------------> Unsqueeze -> Mul
                                                                    -> Reshape [.., K]

    Plain ``Gather`` nodes because every input of the lookup is then an initializer read as
    stored: ``GatherBlockQuantized`` needs its scales with the data's rank (``[N, nb, 1]``)
    and ``MatMulNBits`` refuses that shape ("scales initializer shape {N,nb,1} does not match
    attribute-derived shape", ORT 1.32), so they went through ``Reshape`` nodes, which ONNX
    Runtime constant-folds into private copies at load (Qwen2.5-0.5B: 17 MB of scales and 4
    MB of zero points; Gemma 3 270M: 26 MB). Read as stored, the lookup's inputs are the
    file's memory-mapped pages, of which it touches the rows it reads. Same numbers: the
    difference of two integers is exact in float, then one product."""
    graph = model.graph
    a = _attrs(head)
    k, bits, bs = a["K"], a["bits"], a["block_size"]
    base = node.name or node.output[0]
    scales = next(t for t in graph.initializer if t.name == head.input[2])
    to = scales.data_type
    last = numpy_helper.from_array(np.array([-1], np.int64), f"{base}/tied_last_axis")
    row_shape = numpy_helper.from_array(np.array([0] * rank + [k], np.int64),
                                        f"{base}/tied_row_shape")
    graph.initializer.extend([last, row_shape])
    ids = node.input[1]

    def op(kind, inputs, suffix, **attrs):
        return helper.make_node(kind, inputs, [f"{base}/{suffix}"], name=f"{base}/{suffix}",
                                **attrs)

    nodes = [op("Gather", [head.input[1], ids], "tied_blocks", axis=0)]
    codes = f"{base}/tied_blocks"
    if bits == 4:
        low = numpy_helper.from_array(np.array(15, np.uint8), f"{base}/tied_low_nibble")
        four = numpy_helper.from_array(np.array(4, np.uint8), f"{base}/tied_nibble_shift")
        graph.initializer.extend([low, four])

        def unpack(packed: str, suffix: str, shape: list[int]) -> str:
            """``[.., m]`` bytes -> ``[.., 2m]`` values (low nibble first) -> ``shape``."""
            target = numpy_helper.from_array(np.array(shape, np.int64), f"{base}/{suffix}_shape")
            graph.initializer.append(target)
            nodes.extend([
                op("BitwiseAnd", [packed, low.name], f"{suffix}_low"),
                op("BitShift", [packed, four.name], f"{suffix}_high", direction="RIGHT"),
                op("Unsqueeze", [f"{base}/{suffix}_low", last.name], f"{suffix}_low_b"),
                op("Unsqueeze", [f"{base}/{suffix}_high", last.name], f"{suffix}_high_b"),
                op("Concat", [f"{base}/{suffix}_low_b", f"{base}/{suffix}_high_b"],
                   f"{suffix}_pairs", axis=-1),
                op("Reshape", [f"{base}/{suffix}_pairs", target.name], suffix)])
            return f"{base}/{suffix}"

        codes = unpack(codes, "tied_nibbles", [0] * (rank + 1) + [bs])
    nodes.append(op("Cast", [codes], "tied_codes", to=to))
    if len(head.input) > 3 and head.input[3]:
        nodes.append(op("Gather", [head.input[3], ids], "tied_zero_points", axis=0))
        zero_codes = f"{base}/tied_zero_points"
        if bits == 4:  # two blocks' zero points a byte (share_tied_nbits_table: K / bs even)
            zero_codes = unpack(zero_codes, "tied_zero_nibbles", [0] * rank + [k // bs])
        nodes += [op("Cast", [zero_codes], "tied_zero_points_f", to=to),
                  op("Unsqueeze", [f"{base}/tied_zero_points_f", last.name], "tied_zero_points_b")]
        zero = f"{base}/tied_zero_points_b"
    else:  # MatMulNBits' implied zero point of unsigned codes: 2 ** (bits - 1)
        zero = numpy_helper.from_array(
            np.array(1 << (bits - 1), helper.tensor_dtype_to_np_dtype(to)),
            f"{base}/tied_zero_point")
        graph.initializer.append(zero)
        zero = zero.name
    nodes += [op("Sub", [f"{base}/tied_codes", zero], "tied_centered"),
              op("Gather", [head.input[2], ids], "tied_scales", axis=0),
              op("Unsqueeze", [f"{base}/tied_scales", last.name], "tied_scales_b"),
              op("Mul", [f"{base}/tied_centered", f"{base}/tied_scales_b"], "tied_dequantized")]
    nodes.append(helper.make_node("Reshape", [f"{base}/tied_dequantized", row_shape.name],
                                  list(node.output), name=f"{base}/tied_rows"))
    for n in nodes[:1]:
        n.metadata_props.extend(node.metadata_props)
    idx = list(graph.node).index(node)
    graph.node.remove(node)
    for n in reversed(nodes):
        graph.node.insert(idx, n)


def looks_up_head_bytes(model: onnx.ModelProto) -> bool:
    """Whether a lookup (``Gather``, or ``GatherBlockQuantized``) reads a ``MatMulNBits``'
    weight bytes as they are
    (:func:`_gather_blocks`): the graph then keeps its weights in ``model.onnx.data``, which
    ONNX Runtime memory-maps, so the session's lookup table is the file's pages and not a
    second private copy beside the head's pre-packed weights."""
    heads = {n.input[1] for n in model.graph.node if n.op_type == "MatMulNBits"}
    return any(n.op_type in ("Gather", "GatherBlockQuantized") and n.input[0] in heads
               for n in model.graph.node)
