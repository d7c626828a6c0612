"""HQQ for one ``MatMul`` weight, the numbers ONNX Runtime's ``HQQWeightOnlyQuantizer`` writes,
several times faster.

ONNX Runtime's implementation (``matmul_nbits_quantizer.HQQWeightOnlyQuantizer``:
``quantize_internal`` + ``optimize_weights``, float32 torch on CPU) runs each of its up to
20 proximal iterations as ~15 whole-tensor torch ops: every op streams the whole weight
through memory, with a fresh allocation per intermediate (a 4864 x 896 MLP weight: ~7 s on
this project's 2-core machine; the 24 layers of Qwen2.5-0.5B: ~13 min). Here each iteration
runs the same ops, in the same order and on the same float32 values, over slices of rows
small enough to stay in the CPU cache, writing into buffers allocated once. Per element every
op is the same torch kernel on the same inputs, so the result is the same bit for bit; the
only whole-tensor reduction (the mean error deciding the early stop) is still one
``torch.mean`` over a buffer holding every element's error, as ONNX Runtime computes it.
tests/unit/quantize/test_hqq.py compares the bytes with ONNX Runtime's on several shapes.
"""

from __future__ import annotations

import numpy as np

#: ONNX Runtime's defaults (``optimize_weights``' ``opt_params``)
LP_NORM, BETA, KAPPA, ITERS = 0.7, 1e1, 1.01, 20
#: rows of ``[groups, block_size]`` per slice: 256 KiB of float32 at block 32
SLICE_VALUES = 1 << 14


def hqq_quantize(w: np.ndarray, bits: int = 4, block_size: int = 32
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HQQ of a ``[K, N]`` float weight (``K % block_size == 0``) along ``K``.

    Returns ``(packed, scales, zero_points)`` as ONNX Runtime's HQQ writes them for
    ``MatMulNBits``: ``packed`` uint8 ``[N, K / block_size, block_size * bits / 8]``,
    ``scales`` and float ``zero_points`` ``[N * K / block_size]`` in ``w``'s dtype."""
    import torch

    if bits not in (4, 8) or w.ndim != 2 or w.shape[0] % block_size or w.shape[0] == block_size:
        # K == block_size: ORT's padded weight stays a transposed view, so its per-block means
        # sum in another order (last-bit differences); ORT's own code does those
        raise ValueError(f"hqq_quantize takes a 2-D [K, N] weight with K a multiple of the block "
                         f"size (more than one block) and 4 or 8 bits; got shape {w.shape}, "
                         f"block {block_size}, bits {bits}")
    k, n = w.shape
    max_v = float(2 ** bits - 1)
    # ORT: tensor.float() of the transposed weight, padded (a copy), grouped along K
    weight = torch.from_numpy(np.ascontiguousarray(np.asarray(w, dtype=np.float32).T))
    weight = weight.reshape(-1, block_size)
    _min = weight.min(axis=1, keepdim=True)[0]
    _max = weight.max(axis=1, keepdim=True)[0]
    scale = (max_v / (_max - _min)).clamp(max=2e4)
    span = _max - _min
    if (span == 0).sum().item() > 0:
        span[span == 0] = max_v
        scale = (max_v / span).clamp(max=2e4)
    zero = torch.round(-_min * scale)
    del _min, _max, span
    zero, w_q = _optimize(weight, scale, zero, max_v)
    q = w_q.to(torch.uint8).reshape(n, k).numpy()
    del w_q, weight
    if bits == 4:
        packed = q[:, 0::2] | (q[:, 1::2] << 4)
    else:
        packed = q
    per = 8 // bits
    packed = packed.reshape(n, k // block_size, block_size // per)
    dtype = w.dtype if w.dtype in (np.float16, np.float32) else np.float32
    scales = (1.0 / scale).numpy().reshape(-1).astype(dtype)
    return packed, scales, zero.numpy().reshape(-1).astype(dtype)


def _slices(rows: int, block_size: int):
    step = max(1, SLICE_VALUES // block_size)
    return [slice(s, min(rows, s + step)) for s in range(0, rows, step)]


def _optimize(w_f, scale, zero, max_v: float):
    """``optimize_weights`` of ONNX Runtime (axis 1, p = 0.7), slice by slice, then the
    final rounding; returns the zero points (the scale is not changed by it) and the
    quantized values (float, ``w_f``'s shape).

    Each slice is small enough that torch runs its ops in the calling thread (torch's own
    2-thread split of such small ops costs more than the op under load: ``round_`` measured
    12 ms a call instead of 10 us); the slices are shared between ``torch.get_num_threads()``
    Python threads instead (torch releases the GIL inside its ops)."""
    import torch
    from concurrent.futures import ThreadPoolExecutor

    threads = torch.get_num_threads()
    slices = _slices(w_f.shape[0], w_f.shape[1])
    workers = max(1, min(threads, len(slices)))
    parts = [slices[i::workers] for i in range(workers)]
    err = torch.empty_like(w_f)  # |w_f - w_r| of every element: the early stop's mean
    new_zero = torch.empty_like(zero)
    width = slices[0].stop - slices[0].start
    buffers = [tuple(torch.empty((width, w_f.shape[1])) for _ in range(4)) for _ in parts]

    def step(part, bufs, cur, nxt, inv_beta):
        w_q, w_r, x, t = bufs
        for rows in part:
            m = rows.stop - rows.start
            wf, sc, zp = w_f[rows], scale[rows], cur[rows]
            q, r, xx, tt = w_q[:m], w_r[:m], x[:m], t[:m]
            # w_q = round(w_f * scale + zero).clamp(0, max)
            torch.mul(wf, sc, out=q)
            q.add_(zp).round_().clamp_(0, max_v)
            # w_r = (w_q - zero) / scale
            torch.sub(q, zp, out=r)
            r.div_(sc)
            # x = w_f - w_r; w_e = sign(x) * relu(|x| - (1/beta) * (|x| + 1e-8) ** (p - 1))
            torch.sub(wf, r, out=xx)
            torch.abs(xx, out=err[rows])
            torch.add(err[rows], 1e-8, out=tt)
            tt.pow_(LP_NORM - 1)
            tt.mul_(inv_beta)
            torch.sub(err[rows], tt, out=tt)
            tt.relu_()
            xx.sign_()
            xx.mul_(tt)  # w_e
            # zero = mean(w_q - (w_f - w_e) * scale, axis=1)
            torch.sub(wf, xx, out=tt)
            tt.mul_(sc)
            torch.sub(q, tt, out=tt)
            torch.mean(tt, dim=1, keepdim=True, out=nxt[rows])

    def final(part, cur):
        for rows in part:
            q = err[rows]
            torch.mul(w_f[rows], scale[rows], out=q)
            q.add_(cur[rows]).round_().clamp_(0, max_v)

    beta = BETA
    best_error = 1e4
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            for _ in range(ITERS):
                inv_beta = 1.0 / beta
                done = [pool.submit(step, part, bufs, zero, new_zero, inv_beta)
                        for part, bufs in zip(parts, buffers, strict=True)]
                for d in done:
                    d.result()
                zero, new_zero = new_zero, zero
                beta *= KAPPA
                current_error = float(err.mean())
                if current_error < best_error:
                    best_error = current_error
                else:
                    break
            # the final rounding: w_q = round(w_f * scale + zero).clamp(0, max), in err
            done = [pool.submit(final, part, zero) for part in parts]
            for d in done:
                d.result()
    finally:
        torch.set_num_threads(threads)
    return zero, err
