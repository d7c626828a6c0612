"""``--auto``: candidate recipes from the smallest up.

Each candidate is the user's recipe with one or more tensors kept at a higher precision
(``lm_head`` or its frequent tokens' rows, the first and last decoder layers, which are the
most sensitive in small decoders) or a smaller block size. Candidates are ordered by their estimated size
(computed from the weight shapes, before anything is quantized); the pipeline tries
them in that order and keeps the first inside the gate.
"""

from __future__ import annotations

import math

from slmedge.device_profiles.schema import QDQ_SCHEMES

from .graph import GraphFacts
from .recipe import CalibrationMethod, QuantRecipe, QuantScheme, TensorPrecision

#: int8 lm_head rows that --auto tries for a split lm_head (SmolLM2-135M: 8192 of 49,152 rows,
#: the rest symmetric int4: +3.4% perplexity in total with an int4 body and embedding, vs +4.0%
#: with 4096 rows; an all-int4 lm_head alone costs +5 to +10%)
SPLIT_HEAD_ROWS = 8192


def _matmul_bytes(k: int, n: int, precision: str, block: int, symmetric: bool) -> float:
    if precision == "float":
        return 4.0 * k * n
    bits = 4 if precision == "int4" else 8
    blocks = math.ceil(k / block)
    zp = 0 if symmetric else n * blocks * bits / 8
    return k * n * bits / 8 + n * blocks * 4 + zp


def estimate_bytes(recipe: QuantRecipe, facts: GraphFacts) -> float:
    """Approximate weight bytes of the quantized graph (ordering only; sizes are measured)."""
    keep = set(recipe.keep_layers)
    static = recipe.scheme in QDQ_SCHEMES
    body = "int4" if recipe.scheme is QuantScheme.int4 else "int8"
    kept = "int8" if recipe.scheme is QuantScheme.int4 else "float"
    total = 0.0
    for w in facts.weight_matmuls:
        if w.node == facts.lm_head and recipe.lm_head_int8_tokens:
            rows = min(recipe.lm_head_int8_tokens, w.n)
            total += _matmul_bytes(w.k, rows, "int8", recipe.block_size, recipe.symmetric)
            total += _matmul_bytes(w.k, w.n - rows, "int4", recipe.block_size, True)
            continue
        if w.node == facts.lm_head:
            prec = recipe.lm_head_precision.value
        else:
            prec = kept if w.layer in keep else body
        # per-channel: one scale per column; int8 nbits: the block of the weight's kind
        block = w.k if static else recipe.block_for(w.kinds, w.node == facts.lm_head)
        total += _matmul_bytes(w.k, w.n, prec, block, recipe.symmetric or static)
    emb = facts.embedding_params
    total += emb * (0.5 + 4.0 / recipe.block_size) if recipe.embedding is TensorPrecision.int4 else 4.0 * emb
    return total


def candidates(base: QuantRecipe, facts: GraphFacts) -> list[tuple[QuantRecipe, float]]:
    """The recipes ``--auto`` may try, smallest estimated size first (duplicates removed)."""
    last = max(facts.num_layers - 1, 0)
    edges = sorted({0, last}) if facts.num_layers else []
    variants: list[dict] = []
    vocab = next((w.n for w in facts.weight_matmuls if w.node == facts.lm_head), 0)
    if base.scheme is QuantScheme.int4:
        for block in (128, 64, 32):
            for head in (TensorPrecision.int4, TensorPrecision.int8, TensorPrecision.float):
                variants.append({"block_size": block, "lm_head": head})
            # int4 lm_head with the frequent tokens' rows at int8 (head_split.py)
            if vocab >= 4 * SPLIT_HEAD_ROWS:
                variants.append({"block_size": block, "lm_head": TensorPrecision.int4,
                                 "lm_head_int8_tokens": SPLIT_HEAD_ROWS})
        for head in (TensorPrecision.int8, TensorPrecision.float):
            variants.append({"block_size": 32, "lm_head": head, "keep_layers": edges})
    elif base.scheme is QuantScheme.int8:
        variants = [{"lm_head": TensorPrecision.int8}, {"lm_head": TensorPrecision.float},
                    {"lm_head": TensorPrecision.float, "keep_layers": edges}]
    else:
        for method in (CalibrationMethod.minmax, CalibrationMethod.percentile):
            cal = base.calibration.model_copy(update={"method": method})
            variants.append({"calibration": cal, "lm_head": TensorPrecision.float})
            variants.append({"calibration": cal, "lm_head": TensorPrecision.float,
                             "keep_layers": edges})
    seen, out = set(), []
    for change in variants:
        # a variant that sets the lm_head also sets whether it is split
        split = {"lm_head_int8_tokens": 0} if "lm_head" in change else {}
        recipe = QuantRecipe(**{**base.model_dump(), **split, **change})
        key = recipe.model_dump_json()
        if key in seen:
            continue
        seen.add(key)
        out.append((recipe, estimate_bytes(recipe, facts)))
    # Stable: among equal sizes the listed (preferred) order stays.
    out.sort(key=lambda item: item[1])
    return out
