"""GPTQ with activation order on block grids fixed up front, as MatMulNBits integer weights.

``--algorithm gptq-act``. For each weight ``W`` (``[K, N]``, ``y = x @ W``) and the second
moment of its input on calibration text, ``H = E[x^T x]`` (``[K, K]``):

1. every block of ``block_size`` input rows gets its grid from the original weights:
   ``scale = (max - min) / 15`` and the integer zero point ``round(-min / scale)`` per
   block and output column (asymmetric min/max, what MatMulNBits reads as uint4);
2. the rows are visited in decreasing order of ``diag(H)`` (activation order); each row is
   rounded to its block's grid and its rounding error is spread over the rows not yet
   visited, weighted by the inverse Hessian (GPTQ: Frantar et al. 2022), so the error of
   ``x @ W`` on text-like inputs is what gets minimized, not the error of each weight.

Fixing the grids up front ("static groups") is what lets activation order and
MatMulNBits' contiguous blocks coexist, and it keeps a source grid that already is
min/max asymmetric: SmolLM2's Q4_1 GGUF stores each 32-block as ``d * q + m``, whose
min/max grid is ``d`` itself; only ``m`` has to move to a multiple of ``d``. ONNX
Runtime's GPTQ (neural_compressor's) recomputes each group's grid from weights it has
already updated and does not take activation order with contiguous blocks: +20.1%
perplexity on SmolLM2-135M where this gives ~+3% (README). Integer zero points run
MatMulNBits' fast kernels, without the float zero points' correction term.

The MatMulNBits nodes themselves come from ONNX Runtime's quantizer (RTN, asymmetric):
this module only rewrites their ``B``, ``scales`` and ``zero_points`` initializers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

Say = Callable[[str], None]

#: Dampening added to the Hessian's diagonal, as a fraction of its mean (GPTQ's percdamp).
DAMP = 0.01
#: Hessians held in memory per calibration pass (float64); more inputs take more passes.
HESSIAN_BUDGET_BYTES = 2 << 30


# -- calibration statistics -----------------------------------------------------------------

def collect_hessians(
    model_path: str | Path,
    inputs: dict[str, int],
    samples: Callable[[], Iterable[dict]],
    *,
    say: Say = lambda _m: None,
    budget_bytes: int = HESSIAN_BUDGET_BYTES,
) -> dict[str, np.ndarray]:
    """``E[x^T x]`` for each activation ``name -> last dimension`` of the float graph at
    ``model_path``.

    ``samples()`` yields input feeds (a fresh iterator per call: activations that do not
    fit ``budget_bytes`` together take another pass). Each activation is flattened to rows
    of its last dimension. The graph runs from a copy that lists the activations as
    outputs, written next to ``model_path`` (same external data) and removed after.
    """
    import onnxruntime as ort

    model_path = Path(model_path)
    model = onnx.load(str(model_path), load_external_data=False)
    known = {i.name for i in model.graph.input} | {o for n in model.graph.node for o in n.output}
    missing = sorted(set(inputs) - known)
    if missing:
        raise ValueError(f"no activation named {missing[:3]} in {model_path.name}")
    del model  # a graph with inline weights (Gemma 3 270M's fp32: 1.07 GB) is read per pass
    passes: list[list[str]] = [[]]
    used = 0
    for name in sorted(inputs):
        size = inputs[name] ** 2 * 8
        if passes[-1] and used + size > budget_bytes:
            passes.append([])
            used = 0
        passes[-1].append(name)
        used += size
    out: dict[str, np.ndarray] = {}
    probe = model_path.with_name(model_path.stem + ".hessian-probe.onnx")
    try:
        for k, group in enumerate(passes):
            copy = onnx.load(str(model_path), load_external_data=False)
            have = {o.name for o in copy.graph.output}
            for name in group:
                if name not in have:
                    copy.graph.output.append(onnx.helper.make_tensor_value_info(
                        name, onnx.TensorProto.FLOAT, None))
            onnx.save(copy, str(probe))
            del copy  # not beside the session
            session = ort.InferenceSession(str(probe), providers=["CPUExecutionProvider"])
            acc = {n: np.zeros((inputs[n], inputs[n])) for n in group}
            rows = dict.fromkeys(group, 0)  # per activation: one may see fewer positions
            for i, feed in enumerate(samples()):
                values = session.run(group, feed)
                for name, x in zip(group, values, strict=True):
                    x = x.reshape(-1, inputs[name]).astype(np.float64)
                    acc[name] += x.T @ x
                    rows[name] += x.shape[0]
                if i % 16 == 15:
                    say(f"gptq: calibration pass {k + 1}/{len(passes)}, {i + 1} samples")
            if not all(rows.values()):
                raise ValueError("the calibration reader gave no samples")
            out.update({n: a / rows[n] for n, a in acc.items()})
            del session
    finally:
        probe.unlink(missing_ok=True)
    return out


# -- the algorithm --------------------------------------------------------------------------

def block_grid(w: np.ndarray, block_size: int, bits: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Per block of ``block_size`` rows of ``w`` (``[K, N]``): ``scale`` and integer ``zero``,
    both ``[K // block_size, N]``, of the asymmetric min/max grid ``scale * (j - zero)``,
    ``j`` in ``0 .. 2**bits - 1``. A constant block widens its range to include 0.

    (A narrower range chosen by importance-weighted rounding error, as GPTQ's ``mse``
    option does, made SmolLM2 worse: +5.57% instead of +4.79% with 64-blocks in the MLP;
    GPTQ's compensation needs the outliers on the grid.)"""
    k, n = w.shape
    qmax = 2**bits - 1
    blocks = w.reshape(k // block_size, block_size, n)
    lo, hi = blocks.min(axis=1), blocks.max(axis=1)
    flat = hi == lo
    lo = np.where(flat, np.minimum(lo, 0.0), lo)
    hi = np.where(flat, np.maximum(hi, 0.0), hi)
    scale = (hi - lo) / qmax
    scale[scale == 0] = 1.0  # an all-zero block: any scale, j == zero
    zero = np.clip(np.round(-lo / scale), 0, qmax)
    return scale, zero


def gptq_quantize(
    w: np.ndarray,
    hessian: np.ndarray,
    block_size: int,
    *,
    bits: int = 4,
    damp: float = DAMP,
    lazy: int = 128,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ with activation order of ``w`` (``[K, N]``) on :func:`block_grid`'s grids.

    Returns ``(j, scale, zero)``: ``j`` the integer weights (``[K, N]``, ``0 .. 2**bits-1``),
    ``scale`` and ``zero`` per block (``[K // block_size, N]``); the quantized weight is
    ``scale[k // block_size] * (j[k] - zero[k // block_size])``.
    """
    k, n = w.shape
    if k % block_size:
        raise ValueError(f"K={k} is not a multiple of the block size {block_size}")
    if hessian.shape != (k, k):
        raise ValueError(f"Hessian {hessian.shape} does not match K={k}")
    qmax = 2**bits - 1
    h = np.array(hessian, dtype=np.float64)
    scale, zero = block_grid(w, block_size, bits)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0  # an input never active on the text: plain rounding for its row
    h[np.diag_indices(k)] += damp * float(np.mean(np.diag(h)))
    order = np.argsort(-np.diag(h), kind="stable")
    h = h[np.ix_(order, order)]
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: H^-1 = U^T U
    work = np.array(w[order], dtype=np.float64)
    block_of = order // block_size
    j_out = np.empty((k, n), dtype=np.uint8)
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        chunk = work[i1:i2]
        errs = np.empty_like(chunk)
        for i in range(i2 - i1):
            b = block_of[i1 + i]
            j = np.clip(np.round(chunk[i] / scale[b] + zero[b]), 0, qmax)
            j_out[order[i1 + i]] = j
            err = (chunk[i] - scale[b] * (j - zero[b])) / hinv[i1 + i, i1 + i]
            chunk[i + 1:] -= np.outer(hinv[i1 + i, i1 + i + 1:i2], err)
            errs[i] = err
        work[i2:] -= hinv[i1:i2, i2:].T @ errs
    return j_out, scale, zero


def dequantize(j: np.ndarray, scale: np.ndarray, zero: np.ndarray, block_size: int) -> np.ndarray:
    """``scale * (j - zero)`` per block: the ``[K, N]`` weights MatMulNBits computes with."""
    rows = np.repeat(scale, block_size, axis=0)
    return rows * (j.astype(np.float64) - np.repeat(zero, block_size, axis=0))


# -- MatMulNBits layout ---------------------------------------------------------------------

def _pack_nibbles(values: np.ndarray) -> np.ndarray:
    """Pairs along the last axis into bytes, the first of each pair in the low nibble
    (an odd count is padded with 0)."""
    v = values.astype(np.uint8)
    if v.shape[-1] % 2:
        v = np.concatenate([v, np.zeros((*v.shape[:-1], 1), np.uint8)], axis=-1)
    return (v[..., 0::2] | (v[..., 1::2] << 4)).astype(np.uint8)


def pack_matmul_nbits(j: np.ndarray, scale: np.ndarray, zero: np.ndarray, block_size: int):
    """MatMulNBits 4-bit initializers from :func:`gptq_quantize`'s output: ``B``
    (``[N, K/bs, bs/2]`` uint8), ``scales`` (``[N * K/bs]``), ``zero_points``
    (``[N * ceil(K/bs / 2)]`` uint8, two blocks per byte)."""
    k, n = j.shape
    blocks = k // block_size
    b = _pack_nibbles(j.T.reshape(n, blocks, block_size))
    zp = _pack_nibbles(zero.T.astype(np.uint8)).reshape(-1)
    return b, scale.T.reshape(-1), zp


def rewrite_matmul_nbits(
    model: onnx.ModelProto,
    weights: dict[str, np.ndarray] | None = None,
    hessians: dict[str, np.ndarray] | None = None,
    *,
    quantized: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None,
    say: Say = lambda _m: None,
) -> int:
    """Give each 4-bit MatMulNBits whose output is a key of ``weights`` (the float ``[K, N]``
    weight of the MatMul it replaced) GPTQ's weights, scales and zero points, computed
    with ``hessians[its input]``; or, with ``quantized`` (output -> ``(j, scale, zero)``,
    gptq_layered.py), the ones already computed. The node must have integer zero points
    (an asymmetric RTN pass of ORT's quantizer writes them). Returns the number of nodes
    rewritten."""
    inits = {t.name: t for t in model.graph.initializer}
    chosen = quantized if quantized is not None else weights or {}
    todo = [n for n in model.graph.node
            if n.op_type == "MatMulNBits" and n.output[0] in chosen]
    for count, node in enumerate(todo, 1):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("bits", 4) != 4 or len(node.input) < 4 or not node.input[3]:
            raise ValueError(f"{node.name}: gptq-act rewrites 4-bit MatMulNBits with zero points")
        bs = attrs["block_size"]
        if quantized is not None:
            j, scale, zero = quantized[node.output[0]]
            if scale.shape[0] * bs != j.shape[0]:
                raise ValueError(f"{node.name}: quantized with blocks of "
                                 f"{j.shape[0] // scale.shape[0]}, the node has {bs}")
        else:
            w = np.asarray(weights[node.output[0]], dtype=np.float64)
            j, scale, zero = gptq_quantize(w, hessians[node.input[0]], bs)
        b, sc, zp = pack_matmul_nbits(j, scale, zero, bs)
        for slot, value in ((1, b), (2, sc), (3, zp)):
            old = inits[node.input[slot]]
            dtype = numpy_helper.to_array(old).dtype if slot == 2 else np.uint8
            new = numpy_helper.from_array(value.astype(dtype).reshape(tuple(old.dims)), old.name)
            old.CopyFrom(new)
        if count % 16 == 0 or count == len(todo):
            say(f"gptq: {count}/{len(todo)} MatMulNBits")
    return len(todo)
