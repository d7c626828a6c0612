"""Integer zero points for HQQ-style 4-bit blocks: a grid MatMulNBits' fast kernels accept.

HQQ (hqq.py) fits a float zero point per block; ONNX Runtime's CPU MatMulNBits runs a
generic path for float zero points, so slmedge folds them into a correction term
(fold_zero_points.py) that costs decode speed. This module asks what integer zero points
cost in quality when each block keeps HQQ's spirit (fit the grid to the block's weights,
no calibration data):

1. start from HQQ's scale and float zero point of the block (or min/max when none given);
2. for each of the integer zero points ``floor(z)`` and ``ceil(z)`` (clipped to the code
   range) alternate a few times: round the weights on the grid ``scale * (j - zero)``,
   then refit the scale in closed form, the least-squares ``sum(w * d) / sum(d * d)``
   with ``d = j - zero`` (the codes fixed);
3. keep, per block, the zero point whose grid leaves the smaller squared error.

Weights from a Q4_1 GGUF (``d * q + m`` per 32-block, ``m`` a float) have an exact grid
only with a float zero point: on those this is expected to land near plain RTN with
integer zero points (the README's ablation measures it); on weights trained in float
(no source grid) the refit is the cheap part of HQQ that integer zero points keep.
"""

from __future__ import annotations

import numpy as np

#: rounding / refit alternations per candidate zero point
REFIT_ITERS = 6


def _refit(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, qmax: int, iters: int):
    """``w``: ``[B, bs, N]`` blocks; ``scale``, ``zero``: ``[B, N]`` (zero integer).
    Returns ``(j, scale, err)`` after ``iters`` round/refit steps; ``err`` ``[B, N]``."""
    z = zero[:, None, :]
    for _ in range(iters):
        j = np.clip(np.round(w / scale[:, None, :] + z), 0, qmax)
        d = j - z
        den = (d * d).sum(axis=1)
        num = (w * d).sum(axis=1)
        # a block whose codes all sit on the zero point keeps its scale (nothing to fit)
        scale = np.where(den > 0, num / np.where(den > 0, den, 1.0), scale)
        scale = np.where(np.abs(scale) > 1e-12, scale, 1e-12)
    j = np.clip(np.round(w / scale[:, None, :] + z), 0, qmax)
    err = ((w - scale[:, None, :] * (j - z)) ** 2).sum(axis=1)
    return j, scale, err


def int_zero_quantize(w: np.ndarray, block_size: int, *, bits: int = 4,
                      scale: np.ndarray | None = None, float_zero: np.ndarray | None = None,
                      iters: int = REFIT_ITERS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer-zero-point quantization of ``w`` (``[K, N]``, ``y = x @ w``) in blocks of
    ``block_size`` rows, as gptq.py lays it out: returns ``(j, scale, zero)`` with ``j``
    ``[K, N]`` uint8 codes and ``scale``, ``zero`` ``[K // block_size, N]``; the weight
    MatMulNBits computes is ``scale * (j - zero)`` per block.

    ``scale`` / ``float_zero`` (``[K // block_size, N]``): a starting grid, e.g. HQQ's
    (``w ~ scale * (j - float_zero)``); default the block's min/max grid."""
    k, n = w.shape
    if k % block_size:
        raise ValueError(f"K={k} is not a multiple of the block size {block_size}")
    qmax = 2**bits - 1
    blocks = np.asarray(w, dtype=np.float64).reshape(k // block_size, block_size, n)
    if scale is None or float_zero is None:
        lo, hi = blocks.min(axis=1), blocks.max(axis=1)
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)  # keep 0 representable
        scale = (hi - lo) / qmax
        scale[scale == 0] = 1.0
        float_zero = -lo / scale
    scale = np.asarray(scale, dtype=np.float64)
    float_zero = np.asarray(float_zero, dtype=np.float64)
    if scale.shape != (k // block_size, n) or float_zero.shape != scale.shape:
        raise ValueError(f"scale / float_zero must be [{k // block_size}, {n}], got "
                         f"{scale.shape} / {float_zero.shape}")
    best = None
    for z in (np.floor(float_zero), np.ceil(float_zero)):
        z = np.clip(z, 0, qmax)
        j, s, err = _refit(blocks, scale, z, qmax, iters)
        if best is None:
            best = [j, s, z, err]
            continue
        better = err < best[3]
        best[0] = np.where(better[:, None, :], j, best[0])
        best[1] = np.where(better, s, best[1])
        best[2] = np.where(better, z, best[2])
        best[3] = np.minimum(err, best[3])
    j, s, z, _ = best
    return j.reshape(k, n).astype(np.uint8), s, z


def from_hqq(w: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`int_zero_quantize` started from HQQ's grid (hqq.py, ONNX Runtime's numbers):
    HQQ's float zero point rounded down and up, the scale refit for each, the better kept."""
    from .hqq import hqq_quantize

    k, n = w.shape
    if k == block_size:  # one block along K: hqq.py refuses it (ORT's own code differs there)
        return int_zero_quantize(w, block_size)
    _, scales, zeros = hqq_quantize(np.asarray(w, dtype=np.float32), 4, block_size)
    scale = scales.astype(np.float64).reshape(n, k // block_size).T
    zero = zeros.astype(np.float64).reshape(n, k // block_size).T
    return int_zero_quantize(w, block_size, scale=scale, float_zero=zero)


def rewrite_int_zero(model, weight_of, *, say=lambda _m: None) -> int:
    """Give each 4-bit ``MatMulNBits`` of ``model`` (an ``onnx.ModelProto`` with integer zero
    points, e.g. ONNX Runtime's asymmetric RTN) the weights :func:`from_hqq` chooses on its
    float weight ``weight_of(node)`` (``[K, N]``, or None: the node is left as it is).
    Returns the number of nodes rewritten."""
    import onnx
    from onnx import numpy_helper

    from .gptq import pack_matmul_nbits

    inits = {t.name: t for t in model.graph.initializer}
    done = 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("bits", 4) != 4 or len(node.input) < 4 or not node.input[3]:
            continue
        w = weight_of(node)
        if w is None:
            continue
        bs = attrs["block_size"]
        b, sc, zp = pack_matmul_nbits(*from_hqq(w, bs), bs)
        for slot, value in ((1, b), (2, sc), (3, zp)):
            old = inits[node.input[slot]]
            dtype = numpy_helper.to_array(old).dtype if slot == 2 else np.uint8
            old.CopyFrom(numpy_helper.from_array(value.astype(dtype).reshape(tuple(old.dims)),
                                                 old.name))
        done += 1
        say(f"int-zero: {node.name}")
    return done
