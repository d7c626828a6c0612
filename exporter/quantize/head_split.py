"""A split ``lm_head``: rows of frequent tokens at 8 bits, the rest at 4 bits.

The ``lm_head`` of a small decoder is a fifth or more of its weights (SmolLM2-135M: 28M of
135M parameters) and, at 4 bits, the one tensor that costs the most perplexity (+5 to +10%
on its own there, every other weight kept exact). 8 bits cost nothing measurable but read
twice the bytes per token. Most of the probability mass of real text sits on a few thousand
tokens, so their rows keep 8 bits and the other rows take 4:

    MatMul(x, W)  ->  Gather(Concat(MatMul(x, W[:, frequent]), MatMul(x, W[:, rest])), order)

``order`` puts every logit back at its vocabulary index, so the graph's output is
unchanged in shape and meaning. The two MatMuls are then quantized like any other
(:mod:`.weight_only`). Which tokens are frequent comes from the calibration text; the
quality card on the evaluation text says whether the choice holds.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph import constant_values, unique_name

#: Rows are chosen in aligned groups of this many token ids (when the vocabulary divides):
#: putting the logits back in order is then a Gather of V / 64 rows of 64 values, not of V
#: single values (ORT's Gather on the last axis: ~0.3 ms per token for SmolLM2's 49,152).
GROUP = 64


def group_size(vocab: int, rows: int) -> int:
    """``GROUP`` when the vocabulary divides into groups and ``rows`` holds at least eight of
    them; 1 (single tokens) otherwise."""
    return GROUP if vocab % GROUP == 0 and rows >= 8 * GROUP else 1


def frequent_tokens(token_ids: Sequence[int], limit: int, vocab: int, group: int = 1) -> list[int]:
    """Token ids whose lm_head rows stay int8: up to ``limit`` of them, taken in aligned
    groups of ``group`` ids (``group_size``), the groups that occur most often in
    ``token_ids`` first (ties by id); groups never seen are not taken."""
    counts = Counter(t // group for t in token_ids if 0 <= t < vocab)
    ranked = sorted(counts, key=lambda g: (-counts[g], g))[: limit // group]
    return [g * group + i for g in ranked for i in range(group)]


def split_lm_head(model: onnx.ModelProto, head: str, tokens: Sequence[int],
                  group: int = 1) -> tuple[str, str]:
    """Rewrite the ``head`` MatMul of ``model`` (in place) as described above.

    Returns the names of the new MatMuls (frequent rows, other rows). ``tokens`` must be
    distinct, non-empty and fewer than the vocabulary; with ``group`` > 1 they must be whole
    aligned groups of ids, and the logits are put back in order a group at a time."""
    graph = model.graph
    idx = next((i for i, n in enumerate(graph.node) if n.name == head), None)
    if idx is None:
        raise ValueError(f"no node named {head!r} to split")
    node = graph.node[idx]
    weight = constant_values(model).get(node.input[1])
    if weight is None or len(weight.dims) != 2:
        raise ValueError(f"{head}: its weight {node.input[1]!r} is not a constant [K, V] matrix")
    w = numpy_helper.to_array(weight)
    vocab = w.shape[1]
    hi = np.asarray(tokens, dtype=np.int64)
    if not 0 < len(hi) < vocab or len(set(hi.tolist())) != len(hi) or hi.min() < 0 or hi.max() >= vocab:
        raise ValueError(f"{head}: need 1..{vocab - 1} distinct token ids below {vocab}, "
                         f"got {len(hi)}")
    is_hi = np.zeros(vocab, dtype=bool)
    is_hi[hi] = True
    lo = np.flatnonzero(~is_hi)
    concat_order = np.concatenate([hi, lo])
    if group > 1:
        starts = concat_order[::group]
        if vocab % group or (concat_order.reshape(-1, group) - starts[:, None]
                             != np.arange(group)).any() or (starts % group).any():
            raise ValueError(f"{head}: the token ids are not whole aligned groups of {group}")
        concat_order = starts // group  # the split, in groups
    order = np.empty(len(concat_order), dtype=np.int64)
    order[concat_order] = np.arange(len(concat_order))  # logits[v] = concat[order[v]]
    names = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}

    def fresh(base: str) -> str:
        return unique_name(base, names)

    x, y = node.input[0], node.output[0]
    parts = []
    for tag, cols in (("frequent", hi), ("rest", lo)):
        w_name = fresh(f"{node.input[1]}.{tag}_rows")
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w[:, cols]), w_name))
        out = fresh(f"{y}.{tag}")
        parts.append(helper.make_node("MatMul", [x, w_name], [out], name=fresh(f"{head}.{tag}")))
    both = fresh(f"{y}.split_concat")
    order_name = fresh(f"{head}.vocab_order")
    graph.initializer.append(numpy_helper.from_array(order, order_name))
    new = [*parts,
           helper.make_node("Concat", [p.output[0] for p in parts], [both], name=fresh(f"{head}.concat"),
                            axis=-1)]
    if group == 1:
        new.append(helper.make_node("Gather", [both, order_name], [y],
                                    name=fresh(f"{head}.vocab_gather"), axis=-1))
    else:  # [..., V] -> [-1, V / group, group], whole groups gathered, back to [..., V]
        grouped, moved, shape = fresh(f"{y}.groups"), fresh(f"{y}.groups_in_order"), fresh(f"{y}.shape")
        dims = fresh(f"{head}.group_dims")
        graph.initializer.append(numpy_helper.from_array(
            np.array([-1, vocab // group, group], dtype=np.int64), dims))
        new += [helper.make_node("Reshape", [both, dims], [grouped], name=fresh(f"{head}.group")),
                helper.make_node("Gather", [grouped, order_name], [moved],
                                 name=fresh(f"{head}.vocab_gather"), axis=1),
                helper.make_node("Shape", [both], [shape], name=fresh(f"{head}.logits_shape")),
                helper.make_node("Reshape", [moved, shape], [y], name=fresh(f"{head}.ungroup"))]
    for i, n in enumerate(new):
        graph.node.insert(idx + 1 + i, n)
    graph.node.remove(node)
    if not any(weight.name in n.input for n in graph.node):
        keep = [t for t in graph.initializer if t.name != weight.name]
        del graph.initializer[:]
        graph.initializer.extend(keep)
    return parts[0].name, parts[1].name
