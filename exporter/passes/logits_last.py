"""Logits for the last positions only, on request: a ``logits_to_keep`` input.

Generation needs the next-token logits of the last position; the LM head over every
prompt position is wasted work at prefill (SmolLM2: a 576 x 49152 MatMul per token).
``slmedge eval`` (perplexity) needs every position. Both stay possible::

    hidden [B,S,E] ----------------------------> MatMul(lm_head) --> logits [B,S,V]
                          =>
    logits_to_keep (int64 scalar input)
        |
    Unsqueeze -- Neg --> starts = [-k]
                            |
    hidden [B,S,E] --> Slice(starts, [INT64_MAX], axes=[1]) --> MatMul(lm_head)
                                                   --> logits [B, k or S, V]

``logits_to_keep = 0`` keeps all positions (``Slice`` from ``-0 = 0``); ``k`` keeps the
last ``k``, as transformers' ``logits_to_keep``. It is a required input: an optional one
(an initializer listed as input) cannot be bound through IOBinding in ONNX Runtime, and
ORT warns about it at every session creation.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ._base import FusionPass, make_initializer

_ELEMENTWISE = {"Mul", "Div", "Tanh", "Add", "Sub", "Cast"}


class LogitsToKeep(FusionPass):
    name = "logits_to_keep"

    def fuse(self, model: ir.Model) -> int:
        graph = model.graph
        if "logits_to_keep" in {v.name for v in graph.inputs}:
            return 0
        logits = next((v for v in graph.outputs if v.name == "logits"), None)
        node = logits.producer() if logits is not None else None
        while node is not None and node.op_type in _ELEMENTWISE:  # e.g. final soft-capping
            node = next((v.producer() for v in node.inputs if v is not None and v.producer()), None)
        if node is None or node.op_type != "MatMul":
            self.reasons.append("logits are not computed by a MatMul (lm_head) here")
            return 0
        hidden = node.inputs[0]
        if hidden.shape is None or hidden.shape.rank() != 3:
            self.reasons.append("the lm_head input is not [batch, sequence, hidden]")
            return 0
        keep = ir.Value(name="logits_to_keep", shape=ir.Shape([]), type=ir.TensorType(ir.DataType.INT64))
        graph.inputs.append(keep)
        axes0 = make_initializer(graph, "logits_to_keep.axes0", np.array([0], dtype=np.int64))
        end = make_initializer(graph, "logits_to_keep.end", np.array([np.iinfo(np.int64).max], dtype=np.int64))
        axis1 = make_initializer(graph, "logits_to_keep.axis1", np.array([1], dtype=np.int64))
        unsq = ir.node("Unsqueeze", [keep, axes0], name="logits_to_keep.unsqueeze")
        neg = ir.node("Neg", [unsq.outputs[0]], name="logits_to_keep.neg")
        sl = ir.node("Slice", [hidden, neg.outputs[0], end, axis1], name="logits_to_keep.slice")
        sl.outputs[0].dtype = hidden.dtype
        sl.outputs[0].shape = ir.Shape([hidden.shape[0], "kept_positions", hidden.shape[2]])
        graph.insert_before(node, [unsq, neg, sl])
        node.replace_input_with(0, sl.outputs[0])
        for v in [logits]:
            v.shape = ir.Shape([v.shape[0], "kept_positions", v.shape[2]]) if v.shape is not None else None
        return 1
