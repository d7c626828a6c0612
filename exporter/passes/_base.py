"""What every slmedge pass shares: the IR pass contract plus a count of what it fused.

A pass is an ``onnx_ir.passes.InPlacePass`` (STYLE.md section 3). A fusion pass also
has a ``name`` (the key of its count in the manifest) and, after it ran, ``count``: how
many subgraphs it replaced, and ``reasons``: why candidates were left alone (empty
when everything matched).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx_ir as ir

MS_DOMAIN = "com.microsoft"


class FusionPass(ir.passes.InPlacePass):
    """An in-place pass that counts its rewrites."""

    name: ClassVar[str] = ""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.reasons: list[str] = []

    def fuse(self, model: ir.Model) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.reasons = []
        self.count = self.fuse(model)
        return ir.passes.PassResult(model, modified=self.count > 0)


class RuleFusionPass(FusionPass):
    """A fusion made of onnxscript rewrite rules (``pattern`` / ``check`` / ``rewrite``)."""

    def rules(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def fuse(self, model: ir.Model) -> int:
        from onnxscript.rewriter import pattern

        rules = self.rules()
        ruleset = rules if isinstance(rules, pattern.RewriteRuleSet) else pattern.RewriteRuleSet(rules)
        count = ruleset.apply_to_model(model)
        if count:
            ir.passes.common.RemoveUnusedNodesPass()(model)
        return count


# -- small IR helpers used by the hand-written matchers ----------------------------------


def producer(value: ir.Value | None, op_type: str | tuple[str, ...], domain: str = "") -> ir.Node | None:
    """The node producing ``value`` if it is an ``op_type`` node of ``domain``, else None."""
    if value is None:
        return None
    node = value.producer()
    types = (op_type,) if isinstance(op_type, str) else op_type
    if node is None or node.op_type not in types or (node.domain or "") != domain:
        return None
    return node


def constant(value: ir.Value | None) -> np.ndarray | None:
    """The numpy value of an initializer or Constant output, else None."""
    if value is None:
        return None
    tensor = value.const_value
    if tensor is None:
        node = value.producer()
        if node is not None and node.op_type == "Constant" and "value" in node.attributes:
            tensor = node.attributes["value"].value
    return None if tensor is None else tensor.numpy()


def const_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The tensor of an initializer or Constant output without reading its data (weights may
    be lazy: streaming export), else None."""
    if value is None:
        return None
    tensor = value.const_value
    if tensor is None:
        node = value.producer()
        if node is not None and node.op_type == "Constant" and "value" in node.attributes:
            tensor = node.attributes["value"].value
    return tensor


def make_derived_initializer(graph: ir.Graph, name: str, fn, tensors: list[ir.TensorProtocol],
                             dtype: ir.DataType, shape) -> ir.Value:
    """Register ``fn(*arrays of tensors)`` as an initializer computed only when the graph is
    written (a lazy tensor: a transposed or concatenated weight costs no memory before)."""
    from slmedge.exporter.onnx.lazy_weights import lazy_apply

    base, i = name, 0
    while name in graph.initializers:
        i += 1
        name = f"{base}_{i}"
    value = ir.Value(name=name, shape=ir.Shape(list(shape)), type=ir.TensorType(dtype),
                     const_value=lazy_apply(fn, tensors, dtype=dtype, shape=shape, name=name))
    graph.register_initializer(value)
    return value


def scalar(value: ir.Value | None) -> float | None:
    """A constant with exactly one element, as a float."""
    array = constant(value)
    if array is None or array.size != 1:
        return None
    return float(array.reshape(()))


def ints(value: ir.Value | None) -> list[int] | None:
    array = constant(value)
    return None if array is None else [int(v) for v in array.reshape(-1)]


def attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def make_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as an initializer with a name not yet used in ``graph``."""
    base, i = name, 0
    while name in graph.initializers:
        i += 1
        name = f"{base}_{i}"
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def replace_value(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """Every use of ``old`` reads ``new``; a graph output keeps its name and position."""
    if old.is_graph_output():
        name = old.name
        for i, out in enumerate(graph.outputs):
            if out is old:
                graph.outputs[i] = new
        old.name = f"{name}.replaced"
        new.name = name
    ir.convenience.replace_all_uses_with(old, new)
