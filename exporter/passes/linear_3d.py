"""``Reshape(2-D) -> Gemm -> Reshape(3-D)`` -> ``MatMul -> Add`` on the 3-D tensor.

GPT-2's ``Conv1D`` layers are ``addmm(bias, x.view(-1, K), W).view(B, S, N)``, exported
as::

    x [B,S,K] --Reshape[-1,K]--> Gemm(W, bias) --Reshape[B,S,N]--> y
                          =>  x --MatMul(W)--Add(bias)--> y

Same arithmetic, but with the 3-D operands the norm and GELU fusions (and ORT's own
MatMul fusions) expect. ``transB=1`` weights are transposed once, as constants.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ._base import FusionPass, attr, const_tensor, make_derived_initializer, producer, replace_value


def _same_leading_dims(a: ir.Value, b: ir.Value) -> bool:
    if a.shape is None or b.shape is None or a.shape.rank() != 3 or b.shape.rank() != 3:
        return False
    return all(str(x) == str(y) for x, y in zip(list(a.shape)[:2], list(b.shape)[:2]))


class Linear3dFusion(FusionPass):
    name = "MatMul3d"

    def fuse(self, model: ir.Model) -> int:
        graph = model.graph
        count = 0
        for gemm in [n for n in graph if n.op_type == "Gemm" and not n.domain]:
            into = producer(gemm.inputs[0], "Reshape")
            users = gemm.outputs[0].consumers()
            if into is None or len(users) != 1 or users[0].op_type != "Reshape":
                continue
            out_reshape = users[0]
            x, y = into.inputs[0], out_reshape.outputs[0]
            if attr(gemm, "transA", 0) or attr(gemm, "alpha", 1.0) != 1.0 or attr(gemm, "beta", 1.0) != 1.0:
                self.reasons.append(f"{gemm.name}: transA/alpha/beta not the defaults")
                continue
            if not _same_leading_dims(x, y):
                self.reasons.append(f"{gemm.name}: reshapes do not keep [B,S]")
                continue
            weight = gemm.inputs[1]
            if attr(gemm, "transB", 0):
                w = const_tensor(weight)
                if w is None or len(w.shape) != 2:
                    self.reasons.append(f"{gemm.name}: transB on a non-constant weight")
                    continue
                rows, cols = (int(d) for d in w.shape)
                weight = make_derived_initializer(graph, f"{weight.name}.T", np.transpose, [w],
                                                  w.dtype, (cols, rows))
            new = [ir.node("MatMul", [x, weight], name=f"{gemm.name}.matmul")]
            bias = gemm.inputs[2] if len(gemm.inputs) > 2 else None
            if bias is not None:
                new.append(ir.node("Add", [new[-1].outputs[0], bias], name=f"{gemm.name}.bias"))
            for node in new:
                node.outputs[0].dtype = y.dtype
                node.outputs[0].shape = y.shape
            graph.insert_after(out_reshape, new)
            replace_value(graph, y, new[-1].outputs[0])
            count += 1
        if count:
            ir.passes.common.RemoveUnusedNodesPass()(model)
        return count
