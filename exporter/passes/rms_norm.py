"""RMSNorm -> ``SimplifiedLayerNormalization`` (onnxscript's ORT fusion rules, reused)::

    x --Pow(2)--ReduceMean(-1)--Add(eps)--Sqrt--Reciprocal--+
    |                                                       Mul --Mul(weight)--> y
    +-------------------------------------------------------+
                          =>  SimplifiedLayerNormalization(x, weight) --> y

Gemma's ``x * (1 + weight)`` is the same graph once constant folding has turned
``1 + weight`` into an initializer. Runs before the attention fusion, which moves a
per-head q/k norm (Qwen3, Gemma 3) in front of GroupQueryAttention.
"""

from __future__ import annotations

from ._base import RuleFusionPass


class RmsNormFusion(RuleFusionPass):
    name = "SimplifiedLayerNormalization"

    def rules(self):
        from onnxscript.rewriter.ort_fusions.rms_normalization import rms_normalization_ruleset

        return rms_normalization_ruleset
