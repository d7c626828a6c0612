"""A large tied table at 4 bits but its frequent tokens' rows at 8, in the lm_head AND the lookup.

``large_table_bits=4`` (tied_table.py) makes a large tied table and its ``lm_head`` one int4
table: half the bytes of the int8 one, but on SmolLM2-135M +9.1% held-out perplexity (RTN).
Most of real text's probability mass sits on a few thousand tokens, so their rows keep 8 bits
and the other rows take 4, in both places the table is read:

- the ``lm_head``: :func:`head_split.split_lm_head`'s two MatMuls (frequent rows, the rest),
  here written directly as an 8-bit and a 4-bit ``MatMulNBits`` (integer zero points), the
  logits put back at their vocabulary index a group of 64 ids at a time;
- the lookup: each token id's position in that split order (an int32 map, ``[V]``) says
  which part holds its row and where::

      ids -> Gather(position) -> r;  r < H ? row r of the 8-bit part : row r - H of the 4-bit

  both rows read from the head's bytes as they are stored (tied_table.share_tied_nbits_table:
  the 8-bit part by plain Gathers of its blocks, the 4-bit by GatherBlockQuantized), one
  ``Where`` picks. No second table.

The 4-bit rows' grid is chosen by the caller (:func:`quantize_rows`): RTN min/max, HQQ's grid
with integer zero points (int_zero.from_hqq), or GPTQ on the head's input statistics
(gptq.gptq_quantize; the lookup then reads the GPTQ rows too).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from slmedge.runtimes.errors import UnsupportedOp

from .gptq import _pack_nibbles, block_grid, collect_hessians, gptq_quantize
from .graph import drop_unused_initializers, unique_name
from .head_split import frequent_tokens, group_size, split_lm_head
from .int_zero import from_hqq
from .lazy_graph import LazyWeights
from .recipe import QuantRecipe
from .tied_table import share_tied_nbits_table

Say = Callable[[str], None]

#: how the int4 rows are rounded (quantize_rows)
METHODS = ("rtn", "hqq", "gptq")


def quantize_rows(w: np.ndarray, bits: int, block_size: int, method: str = "rtn",
                  hessian: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(j, scale, zero)`` of ``w`` (``[K, N]``: one output column per token) in blocks of
    ``block_size`` along K, integer zero points (gptq.py's layout). ``method``: ``rtn``
    (min/max grid), ``hqq`` (HQQ's grid, integer zero points; 4 bits), ``gptq`` (needs
    ``hessian``, ``E[x^T x]`` of the head's input, ``[K, K]``)."""
    if method == "gptq":
        if hessian is None:
            raise ValueError("method gptq needs the head input's Hessian")
        return gptq_quantize(np.asarray(w, np.float64), hessian, block_size, bits=bits)
    if method == "hqq" and bits == 4:
        return from_hqq(w, block_size)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    k, n = w.shape
    scale, zero = block_grid(np.asarray(w, np.float64), block_size, bits)
    rows = np.repeat(scale, block_size, axis=0), np.repeat(zero, block_size, axis=0)
    j = np.clip(np.round(w / rows[0] + rows[1]), 0, 2**bits - 1)
    return j.astype(np.uint8), scale, zero


#: columns (tokens) rounded per call of :func:`quantize_columns`: each column's rounding
#: (RTN, HQQ's grid, GPTQ's) depends on its own values and the shared Hessian only, so a
#: large table is rounded a slice at a time (Gemma 3 270M's 262k columns: GPTQ's float64
#: work copy 84 MB a slice instead of 1.3 GB)
COLUMNS_PER_CALL = 16384


def quantize_columns(w: np.ndarray, columns: np.ndarray, bits: int, block_size: int,
                     method: str = "rtn", hessian: np.ndarray | None = None,
                     per_call: int = COLUMNS_PER_CALL) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`quantize_rows` of ``w[:, columns]``, ``per_call`` columns at a time (the
    slices' results side by side: no copy of the whole selection)."""
    parts = [quantize_rows(np.ascontiguousarray(w[:, columns[i:i + per_call]]), bits,
                           block_size, method, hessian)
             for i in range(0, len(columns), per_call)]
    if len(parts) == 1:
        return parts[0]
    return tuple(np.concatenate([p[i] for p in parts], axis=1) for i in range(3))


def nbits_matmul(model: onnx.ModelProto, name: str, x: str, out: str, q: tuple, bits: int,
                 block_size: int, accuracy_level: int = 4) -> onnx.NodeProto:
    """A ``MatMulNBits`` computing ``x @ (scale * (j - zero))`` from ``q = (j, scale, zero)``
    (:func:`quantize_rows`), its initializers added to ``model``, laid out as ONNX Runtime's
    quantizer writes them: ``B`` ``[N, K/bs, bs*bits/8]``, scales ``[N, K/bs]``, zero points
    ``[N, K/bs]`` (8 bits) or two a byte ``[N, K/bs/2]`` (4 bits)."""
    j, scale, zero = q
    k, n = j.shape
    nb = k // block_size
    codes = j.T.reshape(n, nb, block_size)
    data = codes.astype(np.uint8) if bits == 8 else _pack_nibbles(codes)
    zp = zero.T.astype(np.uint8)
    if bits == 4:
        zp = _pack_nibbles(zp)
    inits = [numpy_helper.from_array(np.ascontiguousarray(data), f"{name}.B"),
             numpy_helper.from_array(np.ascontiguousarray(scale.T.astype(np.float32)),
                                     f"{name}.scales"),
             numpy_helper.from_array(np.ascontiguousarray(zp), f"{name}.zero_points")]
    model.graph.initializer.extend(inits)
    return helper.make_node("MatMulNBits", [x, *(t.name for t in inits)], [out], name=name,
                            domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block_size, accuracy_level=accuracy_level)


def split_tied_table(model: onnx.ModelProto, head: str, gather: str, w: np.ndarray,
                     frequent: Sequence[int], rest: tuple, block_size: int,
                     high_block_size: int | None = None, lookup: bool = True) -> dict:
    """Rewrite (in place) the ``lm_head`` node ``head`` (a MatMul or MatMulNBits with output
    ``[.., V]``) and the embedding ``Gather`` named ``gather`` (``[V, K]`` table, ids) of a
    tied table whose float weight is ``w`` (``[K, V]``): the ``frequent`` token ids' rows
    as 8-bit RTN (blocks of ``high_block_size``, default ``block_size``), the others from
    ``rest``, ``(j, scale, zero)`` of ``w[:, others]`` at 4 bits (:func:`quantize_rows`, the
    others in increasing id order). ``frequent`` empty: one 4-bit table. ``lookup`` False:
    the lookup keeps its float table (to measure what the head alone costs). Returns counts."""
    graph = model.graph
    vocab = w.shape[1]
    node = next((n for n in graph.node if n.name == head), None)
    look = next((n for n in graph.node if n.name == gather and n.op_type == "Gather"), None)
    if node is None or look is None:
        raise ValueError(f"no lm_head {head!r} or embedding Gather {gather!r} in the graph")
    x, y = node.input[0], node.output[0]
    names = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    idx = list(graph.node).index(node)
    placeholder = unique_name(f"{head}.float_weight", names)
    graph.initializer.append(numpy_helper.from_array(np.zeros((1, 1), np.float32), placeholder))
    matmul = helper.make_node("MatMul", [x, placeholder], [y], name=head)
    graph.node.remove(node)
    graph.node.insert(idx, matmul)
    hi = list(frequent)
    lo = np.setdiff1d(np.arange(vocab), np.asarray(hi, np.int64)) if hi else np.arange(vocab)
    if rest[0].shape != (w.shape[0], len(lo)):
        raise ValueError(f"rest has {rest[0].shape[1]} rows, the table {len(lo)} others")
    high = high_block_size or block_size
    if not hi:
        graph.node.remove(matmul)
        graph.node.insert(idx, nbits_matmul(model, head, x, y, rest, 4, block_size))
        if lookup:
            _swap_lookup(model, look, [(y, None)], names)
        drop_unused_initializers(model)
        return {"int8_rows": 0, "int4_rows": vocab}
    # split_lm_head writes the graph from the weight's columns (its MatMuls, replaced below
    # by MatMulNBits of ``w``'s rows): a [1, V] stand-in gives the same graph without a
    # copy of the table in the protobuf (Qwen2.5-0.5B's: 545 MB fp32)
    graph.initializer.remove(next(t for t in graph.initializer if t.name == placeholder))
    graph.initializer.append(numpy_helper.from_array(np.zeros((1, vocab), np.float32),
                                                     placeholder))
    parts = split_lm_head(model, head, hi, group_size(vocab, len(hi)))
    for part, bits, q, bs in ((parts[0], 8, quantize_rows(w[:, hi], 8, high), high),
                              (parts[1], 4, rest, block_size)):
        mm = next(n for n in graph.node if n.name == part)
        i = list(graph.node).index(mm)
        graph.node.remove(mm)
        graph.node.insert(i, nbits_matmul(model, part, mm.input[0], mm.output[0], q, bits, bs))
    drop_unused_initializers(model)
    outs = [next(n.output[0] for n in graph.node if n.name == p) for p in parts]
    position = np.empty(vocab, np.int32)
    position[np.concatenate([np.asarray(hi, np.int64), lo])] = np.arange(vocab, dtype=np.int32)
    if lookup:
        _swap_lookup(model, look, [(outs[0], len(hi)), (outs[1], None)], names, position)
    drop_unused_initializers(model)
    return {"int8_rows": len(hi), "int4_rows": len(lo)}


def _swap_lookup(model, look, heads, names, position=None) -> None:
    """``look`` reads the heads' bytes: one head, directly; two, through ``position``."""
    graph = model.graph
    if len(heads) == 1:
        if not share_tied_nbits_table(model, look.name, heads[0][0]):
            raise ValueError(f"{look.name}: the lookup cannot read the head's table")
        return
    base, ids, out = look.name, look.input[1], look.output[0]
    split_at = heads[0][1]

    def fresh(s):
        return unique_name(f"{base}/{s}", names)

    consts = {"position": position, "high_rows": np.array(split_at, np.int32),
              "last_high": np.array(split_at - 1, np.int32), "zero": np.array(0, np.int32),
              "last_axis": np.array([-1], np.int64)}
    c = {k: fresh(k) for k in consts}
    graph.initializer.extend(numpy_helper.from_array(v, c[k]) for k, v in consts.items())
    r, is_hi, r_hi, r_lo0, r_lo, m = (fresh(s) for s in
                                      ("row", "is_high", "high_row", "low_row0", "low_row", "mask"))
    e_hi, e_lo = fresh("high_rows_out"), fresh("low_rows_out")
    g_hi, g_lo = fresh("high_lookup"), fresh("low_lookup")
    nodes = [helper.make_node("Gather", [c["position"], ids], [r], name=r, axis=0),
             helper.make_node("Less", [r, c["high_rows"]], [is_hi], name=is_hi),
             helper.make_node("Min", [r, c["last_high"]], [r_hi], name=r_hi),
             helper.make_node("Sub", [r, c["high_rows"]], [r_lo0], name=r_lo0),
             helper.make_node("Max", [r_lo0, c["zero"]], [r_lo], name=r_lo),
             helper.make_node("Gather", [look.input[0], r_hi], [e_hi], name=g_hi, axis=0),
             helper.make_node("Gather", [look.input[0], r_lo], [e_lo], name=g_lo, axis=0),
             helper.make_node("Unsqueeze", [is_hi, c["last_axis"]], [m], name=m),
             helper.make_node("Where", [m, e_hi, e_lo], [out], name=base)]
    rank = next((len(v.type.tensor_type.shape.dim) for v in [*graph.input, *graph.value_info]
                 if v.name == ids and v.type.tensor_type.HasField("shape")), None)
    if rank:  # lets the 8-bit part be read by plain Gathers of the stored blocks
        graph.value_info.extend(helper.make_tensor_value_info(v, TensorProto.INT32, [None] * rank)
                                for v in (r_hi, r_lo))
    i = list(graph.node).index(look)
    graph.node.remove(look)
    for n in reversed(nodes):
        graph.node.insert(i, n)
    for g, (head_out, _) in zip((g_hi, g_lo), heads, strict=True):
        if not share_tied_nbits_table(model, g, head_out):
            raise ValueError(f"{g}: the lookup cannot read the head part's table")


@dataclass
class SplitPlan:
    """What a split tied table needs before the weights are written: the frequent token ids
    (the calibration text's, in aligned groups) and the lm_head input's Hessian (None: the
    4-bit rows RTN)."""

    frequent: list[int]
    hessian: np.ndarray | None
    record: dict


def plan_split(model, lm_head: str, lazy: LazyWeights, recipe: QuantRecipe,
               src: Path | None, tokenizer_dir: Path | None, say: Say) -> SplitPlan:
    """The streaming quantizer's calibration pass of a split tied table (before the weights
    are written; ``lm_head``: the head's node name): the calibration text's token counts
    give the rows kept 8-bit; the fp32 graph ``src`` run over the same text
    (KVCacheCalibrationReader's prefill and decode samples, gptq.collect_hessians) gives
    ``E[x^T x]`` of the lm_head's input (its final norm's output), ``K x K``. With no fp32
    graph (quantize on write) there is no Hessian: the 4-bit rows are RTN (min/max grid)."""
    from .calibration import KVCacheCalibrationReader
    from .core import _tokens_for_calibration

    if tokenizer_dir is None:
        raise UnsupportedOp("the split tied table (large_table_int8_tokens) reads the calibration "
                            "text: it needs the model's tokenizer directory")
    head = next(n for n in model.graph.node if n.name == lm_head)
    k, vocab = (int(d) for d in lazy.protos[head.input[1]].dims)
    ids = _tokens_for_calibration(tokenizer_dir, recipe.calibration, None)
    limit = min(recipe.large_table_int8_tokens, vocab - 1)
    frequent = frequent_tokens(ids, limit, vocab, group_size(vocab, limit))
    record = {"int8_tokens": recipe.large_table_int8_tokens, "calibration_tokens": len(ids)}
    hessian = None
    if src is not None:
        say(f"split tied table: the lm_head input's Hessian ({k} x {k}) from the fp32 graph "
            "over the calibration text")
        # the samples (prefill chunks, decode steps with their caches: ~0.3 GB at Gemma 3
        # 270M's) made first and the reader's fp32 session closed, so that the Hessian's
        # probe session is the only one open: the same feeds, one fp32 session at a time
        reader = KVCacheCalibrationReader(src, ids, recipe.calibration, threads=2)
        samples = list(reader.samples())
        del reader
        hessian = collect_hessians(src, {head.input[0]: k}, lambda: iter(samples))[head.input[0]]
        del samples
        record.update(int4_rounding="gptq", hessian="fp32 graph, lm_head input, calibration text")
    else:
        # RTN, not HQQ's grid: int_zero.from_hqq over a large table's columns took 10.8 GB
        # on Gemma 3 270M's (bench_large_table.json), and on write the models are the large ones
        record.update(int4_rounding="rtn", hessian="none (quantized on write: no fp32 graph)")
    return SplitPlan(frequent, hessian, record)


def split_streamed(model, lazy: LazyWeights, head: str, gather: str, plan_: SplitPlan,
                   recipe: QuantRecipe, high_block: int | None, say: Say) -> dict:
    """:func:`split_tied_table` on the streamed graph: the head's float weight read from
    the source once (``[K, V]``), the 4-bit rows rounded, head and lookup rewritten in place
    (their new tensors inline until ``_finish`` moves them to the data file). The 8-bit rows
    in blocks of ``high_block`` (the scheme's 8-bit block: QuantRecipe.int8_block_for; None:
    ``block_size``)."""
    node = next(n for n in model.graph.node if n.name == head)
    w = np.asarray(lazy.array(node.input[1]), np.float32)
    vocab = w.shape[1]
    is_high = np.zeros(vocab, bool)
    is_high[plan_.frequent] = True
    method = plan_.record["int4_rounding"]
    say(f"split tied table: {len(plan_.frequent)} rows 8-bit, {vocab - len(plan_.frequent)} "
        f"4-bit ({method})")
    rest = quantize_columns(w, np.flatnonzero(~is_high), 4, recipe.block_size, method,
                            plan_.hessian)
    counts = split_tied_table(model, head, gather, w, plan_.frequent, rest, recipe.block_size,
                              high_block)
    return {**counts, **plan_.record, "int8_block_size": high_block or recipe.block_size}
