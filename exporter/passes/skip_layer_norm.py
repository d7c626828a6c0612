"""Residual Add + LayerNorm -> ``SkipLayerNormalization`` (GPT-2; onnxscript's rules)::

    a --+
        Add --> s --> LayerNormalization(gamma, beta) --> y
    b --+       |
                +--> (residual, used later)
                          =>  SkipLayerNormalization(a, b, gamma, beta) --> (y, s)

Needs 3-D ``[B,S,D]`` operands: GPT-2's ``Conv1D`` layers are first turned back into 3-D
MatMuls by :mod:`.linear_3d`.
"""

from __future__ import annotations

from ._base import RuleFusionPass


class SkipLayerNormFusion(RuleFusionPass):
    name = "SkipLayerNormalization"

    def rules(self):
        from onnxscript.rewriter.ort_fusions.skip_normalization import skip_layer_normalization_ruleset

        return skip_layer_normalization_ruleset
