"""A tied embedding / ``lm_head`` table that ONNX Runtime holds once (issue 15, runtime memory).

Tied embeddings export as one ``[V, K]`` table read twice: ``Gather`` for the embedding and
``MatMul(h, Transpose(W))`` for the logits. ONNX Runtime folds the ``Transpose`` into a new
``[K, V]`` constant at load time and MLAS pre-packs the 2-D ``B`` of that MatMul into a
further copy: SmolLM2-135M fp32 held ~732 MB after load for a 541 MB file (the table is
113 MB). A 3-D ``B`` is not pre-packed, and a ``Gather`` along the table's last axis needs
no transposed copy, so the table is stored once as ``[1, K, V]`` and read by both::

    W [V,K] --> Gather(axis 0, ids) --------------------------> embedding [B,S,K]
       \\--> Transpose --> MatMul(h, .) -----------------------> logits [B,S,V]
                          =>
    W_T [1,K,V] --> Gather(axis 2, ids) [1,K,B,S] --> Transpose(0,2,3,1) --> Squeeze(0)
          \\                                                             --> embedding [B,S,K]
           \\--> MatMul(h [B,S,K], .) ---------------------------------> logits [B,S,V]

The same numbers (a gather and a transpose move values; the MatMul sums the same products).
The quantizers turn this form back into the two 2-D tables they know
(:func:`exporter.quantize.graph.fold_weight_transposes`). Float tables only: a quantized
head is a MatMulNBits / GatherBlockQuantized pair with its own sharing (quantize/tied_table.py).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ._base import FusionPass, const_tensor, make_derived_initializer, make_initializer

_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16)

#: Transpose of the ``Gather(axis=2)`` output ``[1, K, B, S]`` to ``[1, B, S, K]``
GATHER_PERM = (0, 2, 3, 1)
#: the largest table compared value by value with a folded ``W.T`` (cleanup.py folds
#: transposes below 2**20 values: tiny test models; a real table keeps its Transpose)
FOLDED_MAX = 1 << 22


class TiedHeadOnce(FusionPass):
    """Store a tied float embedding / ``lm_head`` table once, as ``[1, K, V]``."""

    name = "tied lm_head table stored once ([1,K,V])"

    def fuse(self, model: ir.Model) -> int:
        graph = model.graph
        count = 0
        for node in list(graph):
            if node.op_type != "Transpose" or (node.domain or "") != "":
                continue
            table = node.inputs[0]
            tensor = const_tensor(table)
            if tensor is None or table.producer() is not None or len(tensor.shape) != 2:
                continue
            perm = node.attributes.get("perm")
            if perm is not None and list(perm.as_ints()) != [1, 0]:
                continue
            why = self._why_not(graph, node, table, tensor)
            if why:
                self.reasons.append(f"{table.name}: {why}")
                continue
            self._rewrite(graph, node.outputs[0], table, tensor)
            graph.remove(node, safe=False)
            graph.initializers.pop(table.name, None)
            count += 1
        count += self._fuse_folded(graph)
        if count:
            ir.passes.common.RemoveUnusedNodesPass()(model)
        return count

    @staticmethod
    def _why_not(graph: ir.Graph, transpose: ir.Node, table: ir.Value, tensor) -> str | None:
        if tensor.dtype not in _FLOATS:
            return f"a {tensor.dtype.name} table (float and float16 only)"
        if table.is_graph_input() or table.is_graph_output() or transpose.outputs[0].is_graph_output():
            return "the table or its transpose is a graph input or output"
        users = {(n.op_type, n.domain or "") for n, _ in table.uses()}
        gathers = [n for n, i in table.uses() if n.op_type == "Gather" and i == 0]
        if users != {("Transpose", ""), ("Gather", "")} or len(table.uses()) != 1 + len(gathers):
            return f"read by {sorted(u for u, _ in users)}, not only by a Gather and a Transpose"
        for g in gathers:
            axis = g.attributes.get("axis")
            if axis is not None and axis.as_int() != 0:
                return "a Gather along an axis other than 0"
        heads = transpose.outputs[0].uses()
        if not heads or any(n.op_type != "MatMul" or i != 1 for n, i in heads):
            return "the transposed table feeds something other than MatMul's B"
        for n, _ in heads:
            a = n.inputs[0]
            if a is None or a.shape is None or a.shape.rank() != 3:
                return "the lm_head MatMul's input is not [batch, sequence, hidden] (3-D B would broadcast)"
        return None

    def _fuse_folded(self, graph: ir.Graph) -> int:
        """A table small enough for the cleanup's constant folding (below ``FOLDED_MAX``
        values) reaches here with its transpose folded: a second initializer equal to
        ``W.T``, found by comparing values."""
        count = 0
        for table in list(graph.initializers.values()):
            tensor = table.const_value
            uses = table.uses()
            if (tensor is None or len(tensor.shape) != 2 or tensor.dtype not in _FLOATS
                    or tensor.size > FOLDED_MAX or table.is_graph_input() or table.is_graph_output()
                    or not uses or any(n.op_type != "Gather" or (n.domain or "") != "" or i != 0
                                       or (n.attributes.get("axis") is not None
                                           and n.attributes["axis"].as_int() != 0)
                                       for n, i in uses)):
                continue
            v, k = (int(d) for d in tensor.shape)
            for other in list(graph.initializers.values()):
                t = other.const_value
                if (other is table or t is None or t.dtype != tensor.dtype
                        or [int(d) for d in t.shape] != [k, v] or other.is_graph_output()
                        or other.is_graph_input() or not other.uses()
                        or any(n.op_type != "MatMul" or i != 1 or n.inputs[0] is None
                               or n.inputs[0].shape is None or n.inputs[0].shape.rank() != 3
                               for n, i in other.uses())
                        or not np.array_equal(t.numpy(), tensor.numpy().T)):
                    continue
                self._rewrite(graph, other, table, tensor)
                graph.initializers.pop(other.name, None)
                graph.initializers.pop(table.name, None)
                count += 1
                break
        return count

    @staticmethod
    def _rewrite(graph: ir.Graph, head_b: ir.Value, table: ir.Value, tensor) -> None:
        """The lm_head MatMuls reading ``head_b`` (``W.T``) and the Gathers reading ``table``
        (``W``) read one ``[1, K, V]`` table instead."""
        v, k = (int(d) for d in tensor.shape)
        once = make_derived_initializer(
            graph, f"{table.name}_T", lambda w: w.T.reshape(1, k, v),  # lazy_apply copies
            [tensor], tensor.dtype, [1, k, v])
        for head, _ in list(head_b.uses()):
            head.replace_input_with(1, once)
        axes0 = make_initializer(graph, f"{table.name}_T.axes0", np.array([0], dtype=np.int64))
        for gather, _ in list(table.uses()):
            if gather.op_type != "Gather":
                continue
            out = gather.outputs[0]
            ids = gather.inputs[1]
            base = gather.name or out.name
            new = ir.node("Gather", [once, ids], attributes={"axis": 2}, name=gather.name)
            new.metadata_props.update(gather.metadata_props)  # module scope: quantizers read it
            perm = ir.node("Transpose", [new.outputs[0]], attributes={"perm": list(GATHER_PERM)},
                           name=f"{base}/tied_transpose")
            squeeze = ir.node("Squeeze", [perm.outputs[0], axes0], name=f"{base}/tied_squeeze")
            new.outputs[0].name = f"{out.name}/tied_gather"
            perm.outputs[0].name = f"{out.name}/tied_transposed"
            for value in (new.outputs[0], perm.outputs[0]):
                value.dtype = tensor.dtype
            squeeze.outputs[0].dtype, squeeze.outputs[0].shape = out.dtype, out.shape
            graph.insert_before(gather, [new, perm, squeeze])
            name = out.name
            out.replace_all_uses_with(squeeze.outputs[0], replace_graph_outputs=True)
            graph.remove(gather, safe=False)
            out.name = f"{name}/replaced"
            squeeze.outputs[0].name = name


#: fp32 bytes of one vocabulary chunk of an fp16 head (:class:`Fp16TiedHeadChunks`)
CHUNK_BYTES = 64 << 20

#: an fp16 tied head is chunked only when its fp32 copy would be at least this large (the
#: export's FP16_COPY_MAX_EXTRA): Llama-3.2-3B's (1.58 GB) and Llama-3.1-8B's (2.1 GB), not
#: Llama-3.2-1B's (1.05 GB), Gemma 3 270M's (0.67 GB) or SmolLM2's (0.11 GB). Below it the
#: plain head is kept: in ONNX Runtime's default x86 session it is folded to fp32 once at load
#: and decodes faster (SmolLM2 fp16 chunked: 1.29x slower per step), and a device with fp16
#: kernels computes it in fp16.
CHUNKED_HEAD_MIN_BYTES = 1 << 30


def chunks_head(v: int, k: int) -> bool:
    """Whether an fp16 tied ``[V, K]`` head is computed in vocabulary chunks
    (:data:`CHUNKED_HEAD_MIN_BYTES`, read when called)."""
    return v * k * 4 >= CHUNKED_HEAD_MIN_BYTES


def vocabulary_chunks(v: int, k: int, chunk_bytes: int = CHUNK_BYTES) -> int | None:
    """How many equal chunks an fp16 ``[V, K]`` head is computed in: the fewest (at least 2)
    whose fp32 copy fits ``chunk_bytes``, among the divisors of ``V`` (a Loop's scan outputs
    are all one shape) up to 4x that count; None when ``V`` has no such divisor."""
    want = max(2, -(-v * k * 4 // chunk_bytes))
    return next((n for n in range(want, 4 * want + 1) if v % n == 0), None)


class Fp16TiedHeadChunks(FusionPass):
    """An fp16 tied table stored once (:class:`TiedHeadOnce`) with its lm_head computed one
    vocabulary chunk at a time, each chunk cast to fp32 explicitly.

    ONNX Runtime's CPU MatMul has fp32 kernels only: an fp16 graph's MatMul gets a Cast of its
    fp16 ``B`` inserted, and in a session that keeps fp16 weights fp16
    (quality/memory.py: the export's verification) that Cast runs on every forward. For the
    head it is the whole table: the Llama-3.2-3B-shaped export peaked 1.5 GiB above steady
    state per forward (tools/bench/results/fp16_peak_3b_trace.json), plus the Transpose of the
    table that ONNX Runtime folds into a second fp16 copy (0.78 GiB). Here one chunk of
    ``V / N`` columns at a time (:data:`CHUNK_BYTES` of fp32) is sliced, cast and multiplied.
    The Casts are in the graph: where they are left to ONNX Runtime, its cast insertion turns
    the Slice fp32 too and casts the whole table before it, N times per forward. Each logit is
    the same dot product (bit-identical logits measured on the 3B head shape). Only heads
    whose fp32 copy reaches :data:`CHUNKED_HEAD_MIN_BYTES` (smaller ones keep the graph's own
    head, faster at run time)::

        W_T [1,K,V] --> MatMul(h [B,S,K], .) --> logits [B,S,V] (fp16)
                         =>
        h --> Cast(fp32) --> h32
        Loop i in 0..N-1:  Slice(W_T, i*C, (i+1)*C, axis 2) --> Cast(fp32)
                           --> MatMul(h32, .) --> Cast(fp16) --> scan output [N,B,S,C]
        --> Transpose(1,2,0,3) --> Reshape(0,0,-1) --> logits [B,S,V]
    """

    name = "fp16 tied lm_head in vocabulary chunks"

    def __init__(self, chunk_bytes: int = CHUNK_BYTES) -> None:
        super().__init__()
        self.chunk_bytes = chunk_bytes

    def fuse(self, model: ir.Model) -> int:
        graph = model.graph
        if not any(t.dtype == ir.DataType.FLOAT16 for t in
                   (v.const_value for v in graph.initializers.values()) if t is not None):
            return 0
        tables = [(v.name, [int(d) for d in v.const_value.shape])
                  for v in graph.initializers.values()
                  if v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT16
                  and len(v.const_value.shape) == 2
                  and any(n.op_type == "Gather" for n, _ in v.uses())]
        if not any(chunks_head(*shape) for _, shape in tables):
            self.reasons.extend(
                f"{name}: the head's fp32 copy ({shape[0] * shape[1] * 4 / 1e6:.0f} MB) is below "
                f"{CHUNKED_HEAD_MIN_BYTES / 1e6:.0f} MB: the graph's own head, which ONNX "
                "Runtime folds to fp32 at load" for name, shape in tables)
            return 0
        once = TiedHeadOnce()
        once(model)
        self.reasons.extend(once.reasons)
        count = 0
        for table in list(graph.initializers.values()):
            tensor = table.const_value
            if (tensor is None or tensor.dtype != ir.DataType.FLOAT16 or len(tensor.shape) != 3
                    or not table.name.endswith("_T")):
                continue
            heads = [n for n, i in table.uses() if n.op_type == "MatMul" and i == 1]
            if not heads or not any(n.op_type == "Gather" for n, _ in table.uses()):
                continue
            _, k, v = (int(d) for d in tensor.shape)
            if not chunks_head(v, k):
                self.reasons.append(f"{table.name}: the head's fp32 copy ({v * k * 4 / 1e6:.0f} "
                                    f"MB) is below {CHUNKED_HEAD_MIN_BYTES / 1e6:.0f} MB: one "
                                    "MatMul, which ONNX Runtime folds to fp32 at load")
                continue
            chunks = vocabulary_chunks(v, k, self.chunk_bytes)
            if chunks is None:
                self.reasons.append(f"{table.name}: no divisor of the vocabulary {v} near the "
                                    "chunk count (the head stays one MatMul)")
                continue
            for head in heads:
                self._rewrite(graph, head, table, chunks, v // chunks)
                count += 1
        return count

    @staticmethod
    def _rewrite(graph: ir.Graph, head: ir.Node, table: ir.Value, chunks: int, size: int) -> None:
        base = head.name or table.name
        name = f"{table.name}.chunk"
        trips = make_initializer(graph, f"{name}s", np.array(chunks, np.int64))
        keep_going = make_initializer(graph, f"{name}_cond", np.array(True))
        width = make_initializer(graph, f"{name}_size", np.array(size, np.int64))
        axis0 = make_initializer(graph, f"{name}_axis0", np.array([0], np.int64))
        axis2 = make_initializer(graph, f"{name}_axis2", np.array([2], np.int64))
        shape = make_initializer(graph, f"{name}_logits_shape", np.array([0, 0, -1], np.int64))
        h, logits = head.inputs[0], head.outputs[0]
        f32, f16 = ir.DataType.FLOAT, ir.DataType.FLOAT16

        cast_h = ir.node("Cast", [h], attributes={"to": f32}, name=f"{base}/h_fp32")
        cast_h.outputs[0].name, cast_h.outputs[0].dtype = f"{base}/h_fp32", f32
        i = ir.Value(name=f"{base}/chunk_index", type=ir.TensorType(ir.DataType.INT64),
                     shape=ir.Shape([]))
        cond_in = ir.Value(name=f"{base}/cond_in", type=ir.TensorType(ir.DataType.BOOL),
                           shape=ir.Shape([]))
        start = ir.node("Mul", [i, width], name=f"{base}/start")
        end = ir.node("Add", [start.outputs[0], width], name=f"{base}/end")
        start1 = ir.node("Unsqueeze", [start.outputs[0], axis0], name=f"{base}/start1")
        end1 = ir.node("Unsqueeze", [end.outputs[0], axis0], name=f"{base}/end1")
        piece = ir.node("Slice", [table, start1.outputs[0], end1.outputs[0], axis2],
                        name=f"{base}/slice")
        piece32 = ir.node("Cast", [piece.outputs[0]], attributes={"to": f32},
                          name=f"{base}/slice_fp32")
        part32 = ir.node("MatMul", [cast_h.outputs[0], piece32.outputs[0]], name=f"{base}/part")
        part = ir.node("Cast", [part32.outputs[0]], attributes={"to": f16},
                       name=f"{base}/part_fp16")
        cond_out = ir.node("Identity", [cond_in], name=f"{base}/cond")
        body_nodes = [start, end, start1, end1, piece, piece32, part32, part, cond_out]
        for node in body_nodes:
            node.outputs[0].name = node.name
        piece.outputs[0].dtype, part.outputs[0].dtype = f16, f16
        piece32.outputs[0].dtype = part32.outputs[0].dtype = f32
        cond_out.outputs[0].dtype = ir.DataType.BOOL
        body = ir.Graph([i, cond_in], [cond_out.outputs[0], part.outputs[0]], nodes=body_nodes,
                        name=f"{base}/chunks")
        loop = ir.node("Loop", [trips, keep_going], attributes={"body": body},
                       name=f"{base}/loop")
        loop.metadata_props.update(head.metadata_props)  # module scope: quantizers read it
        loop.outputs[0].name, loop.outputs[0].dtype = f"{base}/parts", f16
        perm = ir.node("Transpose", [loop.outputs[0]], attributes={"perm": [1, 2, 0, 3]},
                       name=f"{base}/parts_transposed")
        perm.outputs[0].name, perm.outputs[0].dtype = f"{base}/parts_transposed", f16
        joined = ir.node("Reshape", [perm.outputs[0], shape], name=f"{base}/logits")
        joined.outputs[0].dtype, joined.outputs[0].shape = logits.dtype, logits.shape
        graph.insert_before(head, [cast_h, loop, perm, joined])
        out_name = logits.name
        logits.replace_all_uses_with(joined.outputs[0], replace_graph_outputs=True)
        graph.remove(head, safe=False)
        logits.name = f"{out_name}/replaced"
        joined.outputs[0].name = out_name


def fp16_tied_head(model: ir.Model, say=None) -> int:
    """An unfused graph's fp16 tied table stored once with its lm_head computed in vocabulary
    chunks (:class:`Fp16TiedHeadChunks`: no whole-table fp32 Cast per forward in a session
    that keeps fp16 weights fp16), for the streamed export and the in-memory one alike; fused
    (fp32) graphs get :class:`TiedHeadOnce` from the fusion pipeline. Returns how many heads
    were rewritten."""
    chunks = Fp16TiedHeadChunks()
    chunks(model)
    if chunks.count and say is not None:
        say("fp16 tied lm_head: table stored once, computed in vocabulary chunks")
    return chunks.count
