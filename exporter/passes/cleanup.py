"""Constant folding and shape-op cleanup, cheaper than onnxscript's default optimizer.

``torch.onnx.export(optimize=True)`` runs onnxscript's optimizer with its whole default
rule set (about 100 s of the ~200 s export of SmolLM2-135M here). The fusions need much
less: constants folded (shape arithmetic of static dims, weight transposes), no-op
Casts/Reshapes/Identities gone, consecutive Reshapes/Transposes/Unsqueezes merged,
duplicate subexpressions and initializers shared, and dead nodes removed.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from ._base import attr, constant, ints

_BIG = 2**62  # a Slice end at or past this is "to the end"


def _is_noop(node: ir.Node) -> bool:
    """Nodes that return their first input unchanged (in value, shape and type)."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
        return False
    x = node.inputs[0] if node.inputs else None
    if x is None:
        return False
    if op == "Transpose":
        perm = attr(node, "perm")
        return perm is not None and list(perm) == sorted(perm)
    if op == "Slice":
        starts, ends = ints(node.inputs[1]), ints(node.inputs[2])
        steps = ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else None
        if starts is None or ends is None:
            return False
        return all(s == 0 for s in starts) and all(e >= _BIG for e in ends) and (
            steps is None or all(s == 1 for s in steps))
    if op == "Cast":
        return x.dtype is not None and attr(node, "to") == x.dtype.value
    if op in ("Mul", "Div", "Add", "Sub"):
        c = constant(node.inputs[1])
        neutral = 0.0 if op in ("Add", "Sub") else 1.0
        if c is None or c.size != 1 or float(c.reshape(())) != neutral:
            return False
        # The constant must not broadcast x to a higher rank or change its type.
        rank_ok = c.ndim == 0 or (x.shape is not None and x.shape.rank() >= c.ndim)
        return rank_ok and x.dtype is not None and x.dtype.numpy() == c.dtype
    return False


class NoOpEliminationPass(ir.passes.InPlacePass):
    """Drop identity Transposes, full-range Slices, same-type Casts and x*1 / x+0."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        removed = 0
        for node in list(graph):
            if not _is_noop(node):
                continue
            x, y = node.inputs[0], node.outputs[0]
            if y.is_graph_output():
                continue
            ir.convenience.replace_all_uses_with(y, x)
            graph.remove(node, safe=True)
            removed += 1
        return ir.passes.PassResult(model, modified=removed > 0)


class LazyTransposeFoldPass(ir.passes.InPlacePass):
    """Fold ``Transpose(weight)`` of a lazy weight (streaming export) into a lazy initializer,
    as FoldConstantsPass folds it for a weight in memory (same name: the Transpose's output;
    same rule), without reading the weight now."""

    def __init__(self, size_limit: int) -> None:
        super().__init__()
        self.size_limit = size_limit

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from slmedge.exporter.onnx.lazy_weights import lazy_apply

        graph = model.graph
        folded = 0
        for node in list(graph):
            if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
                continue
            x, y = node.inputs[0], node.outputs[0]
            tensor = x.const_value if x is not None and x.is_initializer() else None
            perm = attr(node, "perm")
            # FoldConstantsPass folds a Transpose above the size limit too when its input has
            # no other consumer (onnxscript's _DEFAULT_ALWAYS_FOLD_OPS): every untied weight.
            if not isinstance(tensor, ir.LazyTensor) or y.is_graph_output() or (
                    tensor.size > self.size_limit and len(x.consumers()) != 1):
                continue
            perm = list(perm) if perm is not None else list(range(len(tensor.shape)))[::-1]
            shape = [int(tensor.shape[i]) for i in perm]
            name = y.name
            y.name = f"{name}.folded"
            value = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(tensor.dtype),
                             const_value=lazy_apply(lambda a, p=perm: np.transpose(a, p), [tensor],
                                                    dtype=tensor.dtype, shape=shape, name=name))
            graph.register_initializer(value)
            ir.convenience.replace_all_uses_with(y, value)
            graph.remove(node, safe=True)
            folded += 1
        return ir.passes.PassResult(model, modified=folded > 0)


class CleanupPass(ir.passes.InPlacePass):
    """Fold constants, simplify shape ops, share duplicates, drop dead nodes (2 rounds)."""

    def __init__(self, rounds: int = 2, fold_size_limit: int = 1 << 20) -> None:
        super().__init__()
        self.rounds = rounds
        self.fold_size_limit = fold_size_limit

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnxscript.optimizer._constant_folding import FoldConstantsPass

        inner = ir.passes.PassManager(
            [
                LazyTransposeFoldPass(self.fold_size_limit),
                FoldConstantsPass(shape_inference=False, input_size_limit=self.fold_size_limit,
                                  output_size_limit=self.fold_size_limit),
                common_passes.IdentityEliminationPass(),
                NoOpEliminationPass(),
                common_passes.RemoveUnusedNodesPass(),
            ],
            steps=self.rounds,
            early_stop=True,
        )
        result = ir.passes.Sequential(
            common_passes.InlinePass(),
            inner,
            common_passes.RemoveUnusedFunctionsPass(),
            common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
            common_passes.DeduplicateInitializersPass(),
            common_passes.CommonSubexpressionEliminationPass(),
            common_passes.RemoveUnusedNodesPass(),
            common_passes.RemoveUnusedOpsetsPass(),
        )(model)
        return ir.passes.PassResult(model, result.modified)
