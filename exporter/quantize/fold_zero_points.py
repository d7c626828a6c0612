"""Fold MatMulNBits' float zero points into a small correction term.

HQQ writes ``MatMulNBits`` nodes whose ``zero_points`` are float (one per block). ONNX
Runtime's CPU kernels only have fast paths (int8 activations, packed integer weights) for
integer or absent zero points; float ones take the generic path, which decodes about an
order of magnitude slower. With ``b = k // block_size`` the node computes

    W[k, n] = scale[n, b] * (q[k, n] - zp[n, b])
            = scale[n, b] * (q[k, n] - z0) + scale[n, b] * (z0 - zp[n, b])

where ``z0 = 2**(bits - 1)`` is the zero point MatMulNBits assumes when none is given.
So ``y = x @ W`` is the same node without ``zero_points`` plus
``blocksum(x) @ M`` with ``blocksum(x)[..., b] = sum(x[..., b*bs:(b+1)*bs])`` and
``M[b, n] = scale[n, b] * (z0 - zp[n, b])``, a ``[K / bs, N]`` float matrix. The weights
(``q``, ``scale``) are untouched. ``blocksum(x)`` is itself a MatMul with a 0/1 ``[K, K / bs]``
matrix, shared by the nodes that read the same ``x``; so the correction costs two small
MatMuls and an Add per node, with no shape ops (every op is a kernel launch per decode step).

Stored as fp16 (``code_bits`` 16, :class:`QuantRecipe.zero_point_storage`'s default): ``M``
written as fp16 behind one ``Cast`` to the graph's float type, which ONNX Runtime's constant
folding turns back into the fp32 ``M`` at load: 2 bytes per block instead of 4, the decode graph
the fp32 one's, and (one op per matrix, no intermediates) the load peak and RSS after load of
fp32 ``M`` within 4 MB (plain session, same run: SmolLM2-135M 380 vs 386 MB peak, the
Qwen2.5-0.5B-shaped int4 767 vs 763; ``tools/bench/bench_zero_point_load.py``).
fp16's rounding of ``M = scale * d`` moves the zero point by at most ``|d| * 2**-11`` steps
(HQQ's ``|d| <= ~8``: <= ~0.004; reported as the largest, in steps); a node whose ``M`` leaves
fp16's range or moves more than :data:`MAX_CODE_ERROR` keeps fp32 ``M``.

Stored as codes (``code_bits`` 12 or 8): ``M`` is
not written as fp32 but as ``M = scale^T * (lo + step * codes)``, ``codes`` one 12- or 8-bit
integer per block (``[N, K / bs]``) on one affine grid per matrix for ``z0 - zp`` (HQQ's lie
in about +-7.5 steps: SmolLM2's 120 matrices), reusing the node's own ``scales``. 12 bits are
a uint8 high part and the low 4 bits two to a byte (1.5 bytes per block). The ops that
rebuild ``M`` read initializers only, so ONNX Runtime's constant folding turns them back
into the fp32 ``M`` when the session loads: the decode graph and its speed are today's, the
file holds 1.5 (1) bytes per block instead of 4 (Qwen2.5-0.5B's shapes: ~45 MB -> ~17 (11)
MB). The zero points are then rounded to ``step / 2`` (SmolLM2: <= 0.0017 (0.026) steps):
a node keeps its fp32 ``M`` when that would exceed :data:`MAX_CODE_ERROR` quantization steps,
or when it is named in ``keep_exact`` (a source's own blocks, e.g. a Q4_K GGUF's, kept to
fp32 rounding). The rounding is the same for every weight of a block, so its effect on
``x @ W`` grows with ``blocksum(x)`` rather than averaging out as the 4-bit rounding does:
SmolLM2's card moved from KL 0.0033 to 0.0038 with 8-bit codes (README int4 ablation). The
cost is at load: ORT's folding of these ops frees heap that glibc keeps until ``malloc_trim``
(Qwen2.5-0.5B-shaped int4, 12 bits: peak RSS 1155 vs 791 MB): each of the ~15 folded ops
allocates an ``M``-sized intermediate, which is why fp16 (one op) is the default. ::

    fp16:  M16[B,N] -Cast-> M[B,N]                                     (folded at session load)
    codes[N,B] u8 -Cast-Mul(step)-Add(lo)-Mul-Transpose-> M[B,N]    (folded at session load)
    scales ------------(Reshape [N,B])----'
    12 bits: codes = Cast(high u8) * 16 + low nibbles (Floor/Sub of Cast(packed) / 16, Concat)

Applied by an 8-bit MatMulNBits (``code_bits`` -1 or -4: its accuracy level; labels
``folded-i8`` / ``folded-i8a8``): ``blocksum(x) @ M`` is one ``MatMulNBits`` with ``K`` =
the blocks, ``M^T`` int8 in blocks of :data:`NBITS8_BLOCK` along them (symmetric, an fp32
scale each: ~1.25 bytes per block with the padding of the last), which ONNX Runtime keeps
packed as int8 instead of folding to fp32 ``M`` (a probe of 60 ``[152, 4864]`` ``M``: RSS after
load 89 MB at level 4 vs 179 for fp32; level 1 dequantizes per call, 5-15x slower than the
fp32 MatMul, level 4 quantizes the block sums to int8 too and was faster). The rounding is
per 16 blocks of a column, so a block whose scale is small beside its neighbours' moves by
more steps (reported, not bounded): SmolLM2's held-out perplexity +0.4% (README).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .graph import unique_name

_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)


#: largest rounding of a zero point (in quantization steps of its block) that codes may
#: make; a matrix whose ``z0 - zp`` spans more than ``(2**bits - 1) / 8`` steps (8 bits: ~32)
#: keeps fp32 ``M``.
MAX_CODE_ERROR = 1 / 16

#: ``code_bits`` of ``M`` as the weights of an 8-bit MatMulNBits (``blocksum(x) @ M`` one
#: node): ``-level``, its accuracy_level (1: fp32 compute, 4: the block sums int8 too)
NBITS8_LEVELS = (-1, -4)
#: its blocks along ``K / block_size`` (MatMulNBits' smallest)
NBITS8_BLOCK = 16


@dataclass
class FoldReport:
    """What :func:`fold_zero_points` did: ``folded`` nodes, of which ``compact`` store ``M``
    as ``code_bits`` codes (16: as fp16; the rest fp32), and the largest zero-point rounding
    of those in quantization steps (0.0: none rounded)."""

    folded: int = 0
    compact: int = 0
    max_zero_point_error: float = 0.0
    code_bits: int = 0

    @property
    def label(self) -> str | None:
        """The manifest's ``zero_points``: ``folded`` (fp32 ``M``: the same weights),
        ``folded-f16`` / ``folded-u12`` / ``folded-u8`` (zero points rounded,
        ``max_zero_point_error``), None: nothing folded."""
        if not self.folded:
            return None
        if not self.compact:
            return "folded"
        if self.code_bits in NBITS8_LEVELS:
            return "folded-i8" if self.code_bits == -1 else "folded-i8a8"
        return "folded-f16" if self.code_bits == 16 else f"folded-u{self.code_bits}"


def _codes(d: np.ndarray, bits: int) -> tuple[np.ndarray, float, float, float]:
    """``d`` (``z0 - zp``, float64) on a ``bits`` grid: codes (uint16), lo, step, max error."""
    top = 2**bits - 1
    lo, hi = float(d.min()), float(d.max())
    step = (hi - lo) / top if hi > lo else 1.0
    codes = np.clip(np.rint((d - lo) / step), 0, top).astype(np.uint16)
    return codes, lo, step, float(np.abs(codes * step + lo - d).max())


def _half(corr: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, float] | None:
    """``M`` (``[B, N]``) as fp16 and the largest change of a zero point that makes, in steps
    of its block (``scales`` ``[N, B]``, float64); None when over :data:`MAX_CODE_ERROR` (or
    not finite: an ``M`` beyond fp16's range)."""
    with np.errstate(over="ignore"):
        half = corr.astype(np.float16)
    moved = np.abs(half.astype(np.float64) - corr.astype(np.float64)).T  # [N, B]
    with np.errstate(divide="ignore", invalid="ignore"):
        steps = np.where(moved > 0, moved / np.abs(scales), 0.0)
    err = float(steps.max()) if steps.size else 0.0
    if not np.isfinite(half).all() or not np.isfinite(err) or err > MAX_CODE_ERROR:
        return None
    return half, err


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def fold_and_say(model: onnx.ModelProto, code_bits: int, say, keep_exact: Collection[str] = ()
                 ) -> FoldReport:
    """:func:`fold_zero_points` with the progress line the quantizers print."""
    report = fold_zero_points(model, code_bits=code_bits, keep_exact=keep_exact)
    if report.folded:
        kind = ("fp16" if code_bits == 16 else f"{code_bits}-bit codes" if code_bits > 0 else
                f"8-bit MatMulNBits weights (accuracy level {-code_bits})")
        how = (f"; M of {report.compact} as {kind} (zero points rounded by <= "
               f"{report.max_zero_point_error:.4f} step)" if report.compact else "")
        say(f"{report.folded} MatMulNBits: float zero points folded into a blocksum(x) @ M "
            f"correction (fast integer kernels){how}")
    return report


def fold_float_zero_points(model: onnx.ModelProto) -> int:
    """:func:`fold_zero_points` with fp32 ``M`` (the weights unchanged): the count folded."""
    return fold_zero_points(model).folded


def fold_zero_points(model: onnx.ModelProto, *, code_bits: int = 0,
                     keep_exact: Collection[str] = ()) -> FoldReport:
    """Rewrite every MatMulNBits with float zero points in ``model`` (in place).

    Nodes are left unchanged when their zero points are not a float initializer, their
    scales are not an initializer, or they carry a ``g_idx`` input. A ``K`` that is not a
    multiple of ``block_size`` is folded too (the last block holds the rows that exist).
    ``code_bits`` 16 (fp16 ``M``), 12 or 8 (``M`` as codes; module docstring; 0: fp32) except
    for the nodes in ``keep_exact`` and those whose storage would round a zero point by more
    than :data:`MAX_CODE_ERROR` steps (fp16: also an ``M`` out of its range). A graph whose
    scales are fp16 already stores ``M`` as fp16 (its own type) whatever ``code_bits`` 16 says.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    names: set[str] = set(inits) | {i.name for i in graph.input}
    for node in graph.node:
        names.update(node.output)
        if node.name:
            names.add(node.name)

    plans = {}
    for idx, node in enumerate(graph.node):
        if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
            continue
        ins = list(node.input)
        if len(ins) < 4 or not ins[3] or (len(ins) > 4 and ins[4]):
            continue
        zp_t, sc_t = inits.get(ins[3]), inits.get(ins[2])
        if zp_t is None or sc_t is None or zp_t.data_type not in _FLOAT_TYPES:
            continue
        a = _attrs(node)
        k, n, bits, bs = a["K"], a["N"], a["bits"], a["block_size"]
        # ceil: MatMulNBits pads a last block that K does not fill (K=576, block 128: 5
        # blocks, the last of 64 rows); its blocksum below sums the rows that exist
        blocks = -(-k // bs)
        scales = numpy_helper.to_array(sc_t).astype(np.float64).reshape(n, blocks)
        zp = numpy_helper.to_array(zp_t).astype(np.float64).reshape(n, blocks)
        z0 = float(2 ** (bits - 1))
        dtype = numpy_helper.to_array(sc_t).dtype
        corr = (scales * (z0 - zp)).T.astype(dtype)  # [blocks, N]
        packed = None
        if code_bits == 16 and node.name not in keep_exact and dtype != np.float16:
            packed = _half(corr, scales)
        elif code_bits in (8, 12) and node.name not in keep_exact:
            codes, lo, step, err = _codes(z0 - zp, code_bits)
            if err <= MAX_CODE_ERROR:
                packed = (codes, lo, step, err, sc_t, code_bits)
        elif code_bits in NBITS8_LEVELS and node.name not in keep_exact:
            packed = _int8_blocks(corr, scales)
        plans[idx] = (blocks, bs, corr, packed)
    if code_bits not in (0, 8, 12, 16, *NBITS8_LEVELS):
        raise ValueError(f"code_bits is 0 (fp32 M), 16 (fp16 M), 8 or 12 (codes), "
                         f"{' or '.join(map(str, NBITS8_LEVELS))} (8-bit MatMulNBits), "
                         f"not {code_bits}")
    report = FoldReport(folded=len(plans), code_bits=code_bits)
    if not plans:
        return report

    new_nodes: list[onnx.NodeProto] = []
    sums: dict[tuple[str, int, int], str] = {}  # (x, blocks, bs) -> blocksum output
    indicators: dict[tuple[int, int, int], str] = {}  # (K, bs, dtype) -> [K, blocks] 0/1
    dropped_zp: list[str] = []
    for idx, node in enumerate(graph.node):
        if idx not in plans:
            new_nodes.append(node)
            continue
        blocks, bs, corr, packed = plans[idx]
        x = node.input[0]
        base = node.name or node.output[0]
        key = (x, blocks, bs)
        if key not in sums:
            # blocksum(x) = x @ S with S[k, b] = 1 when k // bs == b: one MatMul, any rank of
            # x, no Shape/Reshape ops (each op is a kernel launch per decode step).
            k = _attrs(node)["K"]
            ind_key = (k, bs, corr.dtype.num)
            if ind_key not in indicators:
                ind = np.kron(np.eye(blocks, dtype=corr.dtype), np.ones((bs, 1), corr.dtype))[:k]
                name = unique_name(f"zp_fold/block_indicator_{blocks}x{bs}", names)
                graph.initializer.append(numpy_helper.from_array(ind, name))
                indicators[ind_key] = name
            total = unique_name(f"{base}/zp_fold/blocksum", names)
            new_nodes.append(helper.make_node("MatMul", [x, indicators[ind_key]], [total],
                                              name=total))
            sums[key] = total
        dropped_zp.append(node.input[3])
        if len(node.input) > 4:
            node.input[3] = ""
        else:
            del node.input[3]
        y = node.output[0]
        y_main = unique_name(f"{y}/zp_fold/main", names)
        node.output[0] = y_main
        m_name = unique_name(f"{base}/zp_fold/correction", names)
        if code_bits in NBITS8_LEVELS and packed is not None:
            pass  # M is the 8-bit MatMulNBits' weights, written below
        elif packed is None:
            graph.initializer.append(numpy_helper.from_array(corr, m_name))
        elif code_bits == 16:  # one Cast, folded at load
            half = unique_name(f"{m_name}/fp16", names)
            graph.initializer.append(numpy_helper.from_array(packed[0], half))
            new_nodes.append(helper.make_node("Cast", [half], [m_name], name=m_name,
                                              to=helper.np_dtype_to_tensor_dtype(corr.dtype)))
            report.compact += 1
            report.max_zero_point_error = max(report.max_zero_point_error, packed[1])
        else:
            new_nodes.extend(_rebuild_correction(graph, m_name, packed, corr.dtype, names))
            report.compact += 1
            report.max_zero_point_error = max(report.max_zero_point_error, packed[3])
        delta = unique_name(f"{base}/zp_fold/delta", names)
        new_nodes.append(node)
        if code_bits in NBITS8_LEVELS and packed is not None:
            new_nodes.append(_int8_correction(graph, m_name, packed, sums[key], delta,
                                              -code_bits, names))
            report.compact += 1
            report.max_zero_point_error = max(report.max_zero_point_error, packed[2])
        else:
            new_nodes.append(helper.make_node("MatMul", [sums[key], m_name], [delta],
                                              name=delta))
        new_nodes.append(helper.make_node("Add", [y_main, delta], [y],
                                          name=unique_name(f"{base}/zp_fold/add", names)))

    del graph.node[:]
    graph.node.extend(new_nodes)
    used = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
    unused = {z for z in dropped_zp if z not in used}
    if unused:
        keep = [t for t in graph.initializer if t.name not in unused]
        del graph.initializer[:]
        graph.initializer.extend(keep)
    return report


def _int8_blocks(corr: np.ndarray, scales: np.ndarray | None) -> tuple:
    """``M`` (``[B, N]``) as 8-bit ``MatMulNBits`` weights: ``M^T`` in blocks of
    :data:`NBITS8_BLOCK` along ``B``, symmetric (one scale per block, the default zero point
    128). Returns (packed ``[N, B', blk]`` uint8, scales ``[N, B']``, the largest change of a
    zero point in steps of its block, ``B``)."""
    m_t = corr.T.astype(np.float64)  # [N, B]
    n, b = m_t.shape
    nb = -(-b // NBITS8_BLOCK)
    pad = np.zeros((n, nb * NBITS8_BLOCK), np.float64)
    pad[:, :b] = m_t
    pad = pad.reshape(n, nb, NBITS8_BLOCK)
    sc = (np.abs(pad).max(-1) / 127).astype(corr.dtype)  # [N, B']
    safe = np.where(sc > 0, sc, 1).astype(np.float64)[..., None]
    q = np.clip(np.rint(pad / safe), -127, 127)
    moved = np.abs(q * sc.astype(np.float64)[..., None] - pad).reshape(n, -1)[:, :b]
    err = float("nan")  # no scales: M alone, the change in steps unknown
    if scales is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            steps = np.where(moved > 0, moved / np.abs(scales), 0.0)
        err = float(steps.max()) if steps.size else 0.0
    return (q + 128).astype(np.uint8), sc, err, b


def _int8_correction(graph: onnx.GraphProto, m_name: str, packed: tuple, blocksum: str,
                     out: str, level: int, names: set[str]) -> onnx.NodeProto:
    """``blocksum @ M`` as one 8-bit MatMulNBits (``K`` = the blocks), its initializers added."""
    q, sc, _err, k = packed
    n, _nb, blk = q.shape
    b_name = unique_name(f"{m_name}/q8", names)
    s_name = unique_name(f"{m_name}/scales", names)
    graph.initializer.append(numpy_helper.from_array(q, b_name))
    graph.initializer.append(numpy_helper.from_array(sc.reshape(-1), s_name))
    return helper.make_node("MatMulNBits", [blocksum, b_name, s_name], [out], name=out,
                            domain="com.microsoft", K=k, N=n, bits=8, block_size=blk,
                            accuracy_level=level)


def _rebuild_correction(graph: onnx.GraphProto, m_name: str, packed: tuple, dtype,
                        names: set[str]) -> list[onnx.NodeProto]:
    """Nodes computing ``M`` (``m_name``, ``[B, N]``) from the codes and the node's scales;
    their initializers are added to ``graph``. Constant inputs only: folded at load. The
    arithmetic is fp32 whatever the graph's float type (fp16 holds integers to 2048 only)."""
    codes, lo, step, _err, sc_t, bits = packed
    n, b = codes.shape
    t, dtype = TensorProto.FLOAT, np.dtype(dtype)

    def init(suffix, array):
        name = unique_name(f"{m_name}/{suffix}", names)
        graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    def node(op, inputs, suffix, **attrs):
        out = unique_name(f"{m_name}/{suffix}", names)
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    nodes: list[onnx.NodeProto] = []
    if bits == 8:
        offsets = node("Cast", [init("codes", codes.astype(np.uint8))], "cast", to=t)
    else:  # 12 bits: high byte [N, B] + low nibbles, the first half's low, the second's high
        flat = np.concatenate([codes.reshape(-1), np.zeros(codes.size % 2, np.uint16)])
        half = flat.size // 2
        low = (flat[:half] & 15) | ((flat[half:] & 15) << 4)
        sixteen = init("sixteen", np.array(16, np.float32))
        high = node("Cast", [init("codes", (codes >> 4).astype(np.uint8))], "high", to=t)
        high = node("Mul", [high, sixteen], "high16")
        packed_low = node("Cast", [init("low_nibbles", low.astype(np.uint8))], "low", to=t)
        second = node("Mul", [packed_low, init("sixteenth", np.array(1 / 16, np.float32))],
                      "low_div")
        second = node("Floor", [second], "second")  # exact: a byte / 16 in fp32
        first = node("Sub", [packed_low, node("Mul", [second, sixteen], "second16")], "first")
        low_all = node("Concat", [first, second], "low_all", axis=0)
        if codes.size % 2:
            low_all = node("Slice", [low_all, init("start", np.array([0], np.int64)),
                                     init("end", np.array([codes.size], np.int64))], "low_cut")
        low_all = node("Reshape", [low_all, init("low_shape", np.array([n, b], np.int64))],
                       "low_2d")
        offsets = node("Add", [high, low_all], "codes12")
    offsets = node("Mul", [offsets, init("step", np.array(step, np.float32))], "times_step")
    offsets = node("Add", [offsets, init("lo", np.array(lo, np.float32))], "plus_lo")  # z0 - zp
    scales = sc_t.name
    if sc_t.data_type != t:
        scales = node("Cast", [scales], "scales_fp32", to=t)
    if list(sc_t.dims) != [n, b]:
        scales = node("Reshape", [scales, init("shape", np.array([n, b], np.int64))], "scales")
    m_t = node("Mul", [scales, offsets], "transposed")
    if dtype == np.float32:
        nodes.append(helper.make_node("Transpose", [m_t], [m_name], name=m_name, perm=[1, 0]))
    else:
        m_t = node("Transpose", [m_t], "fp32", perm=[1, 0])
        nodes.append(helper.make_node("Cast", [m_t], [m_name], name=m_name,
                                      to=helper.np_dtype_to_tensor_dtype(dtype)))
    return nodes


#: ops of the compact correction's constant subgraph, as numpy
_NUMPY_OPS = {
    "Cast": lambda xs, a: xs[0].astype(helper.tensor_dtype_to_np_dtype(a["to"])),
    "Mul": lambda xs, a: xs[0] * xs[1],
    "Add": lambda xs, a: xs[0] + xs[1],
    "Reshape": lambda xs, a: xs[0].reshape([int(v) for v in xs[1]]),
    "Sub": lambda xs, a: xs[0] - xs[1],
    "Floor": lambda xs, a: np.floor(xs[0]),
    "Concat": lambda xs, a: np.concatenate(xs, axis=a["axis"]),
    "Slice": lambda xs, a: xs[0][int(xs[1][0]):int(xs[2][0])],
    "Transpose": lambda xs, a: xs[0].transpose(a["perm"]),
}


def materialize_corrections(model: onnx.ModelProto) -> int:
    """Replace the compact corrections' constant subgraphs by their fp32 ``M`` initializers
    (what ONNX Runtime's constant folding does at load), in place: the graph of
    ``compact=False`` with the rounded zero points. For tools and tests that read ``M``.
    Returns the number of corrections materialized."""
    graph = model.graph
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    kept, computed, done = [], [], 0
    for nd in graph.node:
        if "/zp_fold/correction" not in nd.name or nd.op_type not in _NUMPY_OPS or not all(
                i in values for i in nd.input):
            kept.append(nd)
            continue
        values[nd.output[0]] = _NUMPY_OPS[nd.op_type]([values[i] for i in nd.input], _attrs(nd))
        computed.append(nd.output[0])
    read = {i for nd in kept for i in nd.input} | {o.name for o in graph.output}
    for name in computed:
        if name in read:  # an M the decode graph reads
            graph.initializer.append(numpy_helper.from_array(values[name], name))
            done += 1
    if not done:
        return 0
    del graph.node[:]
    graph.node.extend(kept)
    stale = {t.name for t in graph.initializer if "/zp_fold/correction/" in t.name} - read
    keep = [t for t in graph.initializer if t.name not in stale]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return done


def corrections_as_int8(model: onnx.ModelProto, level: int) -> int:
    """Rewrite a folded graph's ``blocksum @ M`` MatMuls (fp32, fp16 or codes ``M``) as the
    8-bit MatMulNBits of accuracy ``level`` that ``code_bits=-level`` writes, in place (for
    benchmarks of an artifact already written: ``M`` is the stored one, rounded once more).
    Returns the number rewritten."""
    materialize_corrections(model)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    names = set(inits) | {o for nd in graph.node for o in nd.output} | {
        nd.name for nd in graph.node if nd.name}
    out, done, dropped = [], 0, set()
    for nd in graph.node:
        m_t = inits.get(nd.input[1]) if nd.op_type == "MatMul" and len(nd.input) == 2 else None
        if m_t is None or "/zp_fold/delta" not in nd.name:
            out.append(nd)
            continue
        packed = _int8_blocks(numpy_helper.to_array(m_t), None)
        out.append(_int8_correction(graph, nd.input[1], packed, nd.input[0], nd.output[0],
                                    level, names))
        dropped.add(nd.input[1])
        done += 1
    del graph.node[:]
    graph.node.extend(out)
    keep = [t for t in graph.initializer if t.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return done
