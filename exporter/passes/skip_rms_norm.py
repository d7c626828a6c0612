"""Residual Add + RMSNorm -> ``SkipSimplifiedLayerNormalization`` (onnxscript's rules)::

    a --+
        Add --> s --> SimplifiedLayerNormalization --> y
    b --+       |
                +--> (residual, used later)
                          =>  SkipSimplifiedLayerNormalization(a, b, weight) --> (y, s)
"""

from __future__ import annotations

from ._base import RuleFusionPass


class SkipRmsNormFusion(RuleFusionPass):
    name = "SkipSimplifiedLayerNormalization"

    def rules(self):
        from onnxscript.rewriter.ort_fusions.skip_normalization import skip_rms_normalization_ruleset

        return skip_rms_normalization_ruleset
