"""GELU variants -> ``com.microsoft`` ``FastGelu`` / ``Gelu`` / ``BiasGelu``.

tanh approximation (GPT-2's ``gelu_new``, written out; or ONNX ``Gelu(approximate=tanh)``,
Gemma's ``gelu_pytorch_tanh``)::

    x --Pow(3)--Mul(0.044715)--Add(x)--Mul(sqrt(2/pi))--Tanh--Add(1)--+
    |                                                                Mul --> y
    +--Mul(0.5)------------------------------------------------------+
                          =>  FastGelu(x) --> y

erf form (ONNX ``Gelu``, or ``0.5*x*(1+erf(x/sqrt2))``)  =>  ``com.microsoft.Gelu(x)``;
then a bias added just before (``Add(MatMul, b)``, ``b`` 1-D) goes into the op:
``FastGelu(x, b)`` / ``BiasGelu(x, b)``.
"""

from __future__ import annotations

import math

from ._base import MS_DOMAIN, RuleFusionPass

_C = math.sqrt(2.0 / math.pi)


def _rules():
    from onnxscript.rewriter import _ir_utils, pattern
    from onnxscript.rewriter.ort_fusions.bias_gelu import bias_gelu_rules
    from onnxscript.rewriter.ort_fusions.gelu import gelu_rules

    class TanhGeluHalfFirst(pattern.RewriteRuleClassBase):
        """``(0.5*x) * (1 + tanh(c*(x + 0.044715*x^3)))`` (GPT-2's association)."""

        def pattern(self, op, x):
            inner = op.Mul(op.Add(x, op.Mul(op.Pow(x, 3.0), 0.044715)), _C)
            return op.Mul(op.Mul(x, 0.5), op.Add(op.Tanh(inner), 1.0))

        def rewrite(self, op, x):
            return op.FastGelu(x, _domain=MS_DOMAIN)

    class OnnxGelu(pattern.RewriteRuleClassBase):
        """ONNX ``Gelu`` (opset 20) -> the contrib op of the same approximation."""

        def pattern(self, op, x):
            return op.Gelu(x, _allow_other_attributes=True, _outputs=["y"])

        def rewrite(self, op, x, y):
            approx = y.producer().attributes.get_string("approximate", "none")
            if approx == "tanh":
                return op.FastGelu(x, _domain=MS_DOMAIN)
            return op.Gelu(x, _domain=MS_DOMAIN)

    class FastGeluBias(pattern.RewriteRuleClassBase):
        def pattern(self, op, x, bias):
            return op.FastGelu(op.Add(x, bias), _domain=MS_DOMAIN)

        def check(self, context, x, bias, **_):
            result = pattern.MatchResult()
            if not _ir_utils.has_rank(bias, 1) or bias.const_value is None:
                return result.fail("bias is not a constant 1-D tensor", bias)
            return result

        def rewrite(self, op, x, bias):
            return op.FastGelu(x, bias, _domain=MS_DOMAIN)

    rules = [
        *TanhGeluHalfFirst.rule().commute(),
        *gelu_rules.rules,
        OnnxGelu.rule(),
    ]
    bias_rules = [*FastGeluBias.rule().commute(), *bias_gelu_rules.rules]
    return rules, bias_rules


class GeluFusion(RuleFusionPass):
    """Counts GELUs fused (with or without a bias folded in)."""

    name = "FastGelu/Gelu"

    def fuse(self, model):
        from onnxscript.rewriter import pattern
        import onnx_ir as ir

        rules, bias_rules = _rules()
        count = pattern.RewriteRuleSet(rules).apply_to_model(model)
        if count:
            self.bias = pattern.RewriteRuleSet(bias_rules).apply_to_model(model)
            model.opset_imports.setdefault(MS_DOMAIN, 1)
            ir.passes.common.RemoveUnusedNodesPass()(model)
        else:
            self.bias = 0
        return count
