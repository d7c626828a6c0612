"""Fold MatMulNBits' float zero points into a small correction term.

HQQ writes ``MatMulNBits`` nodes whose ``zero_points`` are float (one per block). ONNX
Runtime's CPU kernels only have fast paths (int8 activations, packed integer weights) for
integer or absent zero points; float ones take the generic path, which decodes about an
order of magnitude slower. With ``b = k // block_size`` the node computes

    W[k, n] = scale[n, b] * (q[k, n] - zp[n, b])
            = scale[n, b] * (q[k, n] - z0) + scale[n, b] * (z0 - zp[n, b])

where ``z0 = 2**(bits - 1)`` is the zero point MatMulNBits assumes when none is given.
So ``y = x @ W`` is the same node without ``zero_points`` plus
``blocksum(x) @ M`` with ``blocksum(x)[..., b] = sum(x[..., b*bs:(b+1)*bs])`` and
``M[b, n] = scale[n, b] * (z0 - zp[n, b])``, a ``[K / bs, N]`` float matrix. The weights
(``q``, ``scale``) are untouched. ``blocksum(x)`` is itself a MatMul with a 0/1 ``[K, K / bs]``
matrix, shared by the nodes that read the same ``x``; so the correction costs two small
MatMuls and an Add per node, with no shape ops (every op is a kernel launch per decode step).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .graph import unique_name

_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def fold_float_zero_points(model: onnx.ModelProto) -> int:
    """Rewrite every MatMulNBits with float zero points in ``model`` (in place).

    Nodes are left unchanged when their zero points are not a float initializer, their
    scales are not an initializer, or they carry a ``g_idx`` input. A ``K`` that is not a
    multiple of ``block_size`` is folded too (the last block holds the rows that exist).
    Returns the number of rewritten nodes.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    names: set[str] = set(inits) | {i.name for i in graph.input}
    for node in graph.node:
        names.update(node.output)
        if node.name:
            names.add(node.name)

    plans = {}
    for idx, node in enumerate(graph.node):
        if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
            continue
        ins = list(node.input)
        if len(ins) < 4 or not ins[3] or (len(ins) > 4 and ins[4]):
            continue
        zp_t, sc_t = inits.get(ins[3]), inits.get(ins[2])
        if zp_t is None or sc_t is None or zp_t.data_type not in _FLOAT_TYPES:
            continue
        a = _attrs(node)
        k, n, bits, bs = a["K"], a["N"], a["bits"], a["block_size"]
        # ceil: MatMulNBits pads a last block that K does not fill (K=576, block 128: 5
        # blocks, the last of 64 rows); its blocksum below sums the rows that exist
        blocks = -(-k // bs)
        scales = numpy_helper.to_array(sc_t).astype(np.float64).reshape(n, blocks)
        zp = numpy_helper.to_array(zp_t).astype(np.float64).reshape(n, blocks)
        z0 = float(2 ** (bits - 1))
        corr = (scales * (z0 - zp)).T.astype(numpy_helper.to_array(sc_t).dtype)  # [blocks, N]
        plans[idx] = (blocks, bs, corr)
    if not plans:
        return 0

    new_nodes: list[onnx.NodeProto] = []
    sums: dict[tuple[str, int, int], str] = {}  # (x, blocks, bs) -> blocksum output
    indicators: dict[tuple[int, int, int], str] = {}  # (K, bs, dtype) -> [K, blocks] 0/1
    dropped_zp: list[str] = []
    for idx, node in enumerate(graph.node):
        if idx not in plans:
            new_nodes.append(node)
            continue
        blocks, bs, corr = plans[idx]
        x = node.input[0]
        base = node.name or node.output[0]
        key = (x, blocks, bs)
        if key not in sums:
            # blocksum(x) = x @ S with S[k, b] = 1 when k // bs == b: one MatMul, any rank of
            # x, no Shape/Reshape ops (each op is a kernel launch per decode step).
            k = _attrs(node)["K"]
            ind_key = (k, bs, corr.dtype.num)
            if ind_key not in indicators:
                ind = np.kron(np.eye(blocks, dtype=corr.dtype), np.ones((bs, 1), corr.dtype))[:k]
                name = unique_name(f"zp_fold/block_indicator_{blocks}x{bs}", names)
                graph.initializer.append(numpy_helper.from_array(ind, name))
                indicators[ind_key] = name
            total = unique_name(f"{base}/zp_fold/blocksum", names)
            new_nodes.append(helper.make_node("MatMul", [x, indicators[ind_key]], [total],
                                              name=total))
            sums[key] = total
        dropped_zp.append(node.input[3])
        if len(node.input) > 4:
            node.input[3] = ""
        else:
            del node.input[3]
        y = node.output[0]
        y_main = unique_name(f"{y}/zp_fold/main", names)
        node.output[0] = y_main
        m_name = unique_name(f"{base}/zp_fold/correction", names)
        graph.initializer.append(numpy_helper.from_array(corr, m_name))
        delta = unique_name(f"{base}/zp_fold/delta", names)
        new_nodes.append(node)
        new_nodes.append(helper.make_node("MatMul", [sums[key], m_name], [delta], name=delta))
        new_nodes.append(helper.make_node("Add", [y_main, delta], [y],
                                          name=unique_name(f"{base}/zp_fold/add", names)))

    del graph.node[:]
    graph.node.extend(new_nodes)
    used = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
    unused = {z for z in dropped_zp if z not in used}
    if unused:
        keep = [t for t in graph.initializer if t.name not in unused]
        del graph.initializer[:]
        graph.initializer.extend(keep)
    return len(plans)
