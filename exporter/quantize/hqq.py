"""HQQ for one ``MatMul`` weight, the numbers ONNX Runtime's ``HQQWeightOnlyQuantizer`` writes,
many times faster.

ONNX Runtime's implementation (``matmul_nbits_quantizer.HQQWeightOnlyQuantizer``:
``quantize_internal`` + ``optimize_weights``, float32 torch on CPU) runs each of its up to
20 proximal iterations as ~15 whole-tensor torch ops over every element (a 4864 x 896 MLP
weight: ~7 s on this project's 2-core machine; the 24 layers of Qwen2.5-0.5B: ~13 min).
Every block (one row of ``[groups, block_size]``) is independent except for the early stop
(the mean error over all elements), so here:

- each iteration recomputes only the rows whose zero point changed in the previous
  iteration: a row fed the same zero point gives the same error and the same new zero point
  (random N(0, 0.02) weights: rows still changing per iteration 100%, 55%, 35%, 21%, 12%, 7%,
  ... over 15 iterations, i.e. ~2.5 full passes instead of 15);
- the shrink ``sign(x) * relu(|x| - pow(|x| + 1e-8, p - 1) / beta)`` is exactly ``+-0`` where
  ``|x|`` is below ``beta ** (-1 / (2 - p))`` (~0.15: quantization errors of LLM weights are
  ~0.003), so ``pow`` (half of the old time) runs only on rows holding a larger error;
- rows are processed in slices that stay in the CPU cache, with buffers allocated once,
  single-threaded torch shared over Python threads (torch releases the GIL inside its ops).

Per element every remaining op is the same torch kernel on the same float32 inputs (``pow``
always on its vectorized path), the per-row means the same ``torch.mean`` of 32-element rows,
and the early stop the same ``torch.mean`` over every element's error, so the bytes are ONNX
Runtime's: tests/unit/quantize/test_hqq.py compares them with its quantizer and with the
previous implementation of this file.
"""

from __future__ import annotations

import numpy as np

#: ONNX Runtime's defaults (``optimize_weights``' ``opt_params``)
LP_NORM, BETA, KAPPA, ITERS = 0.7, 1e1, 1.01, 20
#: values per slice of rows: 256 KiB of float32 per buffer (measured on 8192 x 2048: CPU time
#: 0.79 s at 1 << 14, 0.70 s at 1 << 16, 0.68 s at 1 << 17: fewer Python calls per element)
SLICE_VALUES = 1 << 16
#: ``pow`` runs on buffers padded to a multiple of this many floats: torch's vectorized loop
#: handles 2 vectors per step and its scalar tail calls ``std::pow``, which differs from the
#: vector ``pow`` in the last bit for ~25% of inputs (measured, torch 2.13 AVX512)
POW_ALIGN = 64
#: the shrink is skipped below this fraction of the exact crossing point: its float32 terms
#: are 1-ulp accurate, so 1% is a margin of ~1e5 ulps (test_shrink_is_zero_below_the_bound)
SHRINK_MARGIN = 0.99


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
    threads = torch.get_num_threads()
    # every op here in the calling thread: torch's 2-thread split of an op costs more than
    # the op under load (measured at load 18 on a 4864 x 896 weight: ~50-100 ms for each
    # whole-matrix op of the scale and zero set-up, whose work is ~1 ms)
    torch.set_num_threads(1)
    try:
        return _quantize(torch, w, bits, block_size, threads)
    finally:
        torch.set_num_threads(threads)


def _quantize(torch, w: np.ndarray, bits: int, block_size: int, threads: int):
    k, n = w.shape
    max_v = float(2 ** bits - 1)
    # ORT: tensor.float() of the transposed weight, padded (a copy), grouped along K
    weight = torch.from_numpy(np.asarray(w, dtype=np.float32)).t().contiguous()
    weight = weight.reshape(-1, block_size)
    _min, _max = torch.aminmax(weight, dim=1, keepdim=True)  # ORT: min(axis=1), max(axis=1)
    scale = (max_v / (_max - _min)).clamp(max=2e4)
    span = _max - _min
    if (span == 0).sum().item() > 0:
        span[span == 0] = max_v
        scale = (max_v / span).clamp(max=2e4)
    zero = torch.round(-_min * scale)
    del _min, _max, span
    zero, q = _Optimizer(weight, scale, max_v, threads).run(zero)
    del weight
    q = q.reshape(n, k).numpy()
    if bits == 4:
        # little-endian pairs (lo, hi), both < 16: lo | hi << 4 is the low byte of v | v >> 4
        v = q.view("<u2")
        packed = (v | (v >> 4)).astype(np.uint8)
    else:
        packed = q
    per = 8 // bits
    packed = packed.reshape(n, k // block_size, block_size // per)
    dtype = w.dtype if w.dtype in (np.float16, np.float32) else np.float32
    scales = (1.0 / scale).numpy().reshape(-1).astype(dtype)
    return packed, scales, zero.numpy().reshape(-1).astype(dtype)


def shrink_bound(inv_beta: float) -> float:
    """An ``|x|`` below which ``relu(|x| - inv_beta * pow(|x| + 1e-8, p - 1))`` is ``0`` in
    float32: ``SHRINK_MARGIN`` times the crossing ``|x| ** (2 - p) = inv_beta`` (the ``1e-8``
    lowers the pow term, so the crossing, by ~1e-8 relative)."""
    return SHRINK_MARGIN * inv_beta ** (1.0 / (2.0 - LP_NORM))


class _Optimizer:
    """``optimize_weights`` of ONNX Runtime (axis 1, p = 0.7) and the final rounding over
    ``w_f`` ``[rows, block]`` with the inverse scales ``[rows, 1]``."""

    def __init__(self, w_f, scale, max_v: float, threads: int):
        import torch

        self.torch = torch
        self.w_f, self.scale, self.max_v = w_f, scale, max_v
        rows, block = w_f.shape
        self.step = max(1, SLICE_VALUES // block)
        self.workers = max(1, min(threads, -(-rows // self.step)))
        self.err = torch.empty_like(w_f)  # |w_f - w_r| of every element: the early stop's mean
        self.row_err = torch.empty((rows, 1))  # max |x| of each row, as last computed
        self.q = torch.empty((rows, block), dtype=torch.uint8)  # w_q of each row, last computed
        # -0.0 in w_f (as int32 the smallest value): w_f - (+-0) is not always w_f bit for
        # bit, so the skipped shrink keeps its ops (no case found where it changes a byte;
        # the shortcut is used only where it is proven equal)
        self.literal = int(w_f.view(torch.int32).min()) == -2 ** 31
        padded = -(-self.step * block // POW_ALIGN) * POW_ALIGN
        self.buffers = [_Buffers(torch, self.step, block, padded) for _ in range(self.workers)]

    def run(self, zero):
        """Iterate from the initial zero points; returns ``(zero, w_q)``, ``w_q`` uint8
        ``[rows, block]``. Run with torch single-threaded: each worker thread runs its ops in
        its own thread (torch releases the GIL inside them)."""
        torch = self.torch
        from concurrent.futures import ThreadPoolExecutor

        beta, best_error = BETA, 1e4
        cur, nxt = zero, torch.empty_like(zero)
        with ThreadPoolExecutor(self.workers) as pool:
            for it in range(ITERS):
                inv_beta = 1.0 / beta
                bound = shrink_bound(inv_beta)
                if it == 0:
                    items = self._all_rows()
                else:
                    # a row with last iteration's zero point and no shrink gives what it gave
                    changed = cur.view(torch.int32) != nxt.view(torch.int32)
                    changed |= (self.row_err < bound).logical_not_()  # NaN: recompute
                    items = self._items(changed.view(-1).nonzero().view(-1))
                    nxt.copy_(cur)
                self._map(pool, self._iterate, items, cur, nxt, inv_beta, bound)
                cur, nxt = nxt, cur
                beta *= KAPPA
                current_error = float(self.err.mean())
                if current_error < best_error:
                    best_error = current_error
                else:
                    break
            # the final rounding with the last zero points: w_q of the rows they changed
            changed = (cur.view(torch.int32) != nxt.view(torch.int32)).view(-1)
            self._map(pool, self._round, self._items(changed.nonzero().view(-1)), cur)
        return cur, self.q

    def _all_rows(self):
        rows = self.w_f.shape[0]
        return [slice(s, min(rows, s + self.step)) for s in range(0, rows, self.step)]

    def _items(self, index):
        """Work items for the rows in ``index``: row slices when most rows are in it."""
        if index.numel() * 4 > self.w_f.shape[0] * 3:
            return self._all_rows()
        return list(index.split(self.step)) if index.numel() else []

    def _map(self, pool, fn, items, *args):
        if not items:
            return
        workers = min(self.workers, len(items))
        done = [pool.submit(self._run, fn, items[i::workers], self.buffers[i], *args)
                for i in range(workers)]
        for d in done:
            d.result()

    @staticmethod
    def _run(fn, items, bufs, *args):
        for item in items:
            fn(item, bufs, *args)

    def _iterate(self, item, bufs, cur, nxt, inv_beta: float, bound: float):
        """One iteration on the rows ``item`` (a slice, or an index tensor: gathered into
        ``bufs`` and scattered back)."""
        torch = self.torch
        if isinstance(item, slice):
            m = item.stop - item.start
            wf, sc, zp = self.w_f[item], self.scale[item], cur[item]
            e, re, nz, qu = self.err[item], self.row_err[item], nxt[item], self.q[item]
        else:
            m = item.numel()
            wf, sc, zp = (torch.index_select(src, 0, item, out=dst[:m]) for src, dst in
                          ((self.w_f, bufs.wf), (self.scale, bufs.sc), (cur, bufs.zp)))
            e, re, nz, qu = bufs.e[:m], bufs.re[:m], bufs.nz[:m], bufs.qu[:m]
        p, q, x, t = bufs.p[:m], bufs.q[:m], bufs.x[:m], bufs.t[:m]
        # w_q = round(w_f * scale + zero).clamp(0, max)
        torch.mul(wf, sc, out=p)
        torch.add(p, zp, out=q)
        q.round_().clamp_(0, self.max_v)
        qu.copy_(q)
        # x = w_f - w_r, w_r = (w_q - zero) / scale: addcdiv's w_f + (-1 * a) / b is that
        torch.sub(q, zp, out=x)
        torch.addcdiv(wf, x, sc, value=-1, out=x)
        torch.abs(x, out=e)
        torch.amax(e, dim=1, keepdim=True, out=re)
        top = float(re.max())
        if top < bound and not self.literal:
            # w_e = +-0: (w_f - w_e) * scale is w_f * scale
            torch.sub(q, p, out=t)
        else:
            # w_e = sign(x) * relu(|x| - (1/beta) * (|x| + 1e-8) ** (p - 1)): 0 below bound
            t.zero_()
            if not top < bound:
                self._shrink(e, (re.view(-1) < bound).logical_not_().nonzero().view(-1), t,
                             bufs, inv_beta)
            x.sign_()
            x.mul_(t)
            # zero = mean(w_q - (w_f - w_e) * scale, axis=1)
            torch.sub(wf, x, out=t)
            t.mul_(sc)
            torch.sub(q, t, out=t)
        torch.mean(t, dim=1, keepdim=True, out=nz)
        if not isinstance(item, slice):
            for dst, src in ((self.err, e), (self.row_err, re), (nxt, nz), (self.q, qu)):
                dst.index_copy_(0, item, src)

    def _shrink(self, e, sel, t, bufs, inv_beta: float):
        """``relu(|x| - inv_beta * pow(|x| + 1e-8, p - 1))`` of the rows ``sel`` of ``e`` into
        the same rows of ``t``, on buffers padded to ``POW_ALIGN``."""
        torch = self.torch
        count, block = sel.numel(), e.shape[1]
        size = count * block
        padded = -(-size // POW_ALIGN) * POW_ALIGN
        a, b = bufs.pow_a[:padded], bufs.pow_b[:padded]
        torch.index_select(e, 0, sel, out=a[:size].view(count, block))
        a[size:].fill_(1.0)
        torch.add(a, 1e-8, out=b)
        b.pow_(LP_NORM - 1)
        b.mul_(inv_beta)
        torch.sub(a, b, out=b)
        b.relu_()
        t.index_copy_(0, sel, b[:size].view(count, block))

    def _round(self, item, bufs, cur):
        """The final ``w_q = round(w_f * scale + zero).clamp(0, max)`` of the rows ``item``."""
        torch = self.torch
        if isinstance(item, slice):
            m = item.stop - item.start
            wf, sc, zp, qu = self.w_f[item], self.scale[item], cur[item], self.q[item]
        else:
            m = item.numel()
            wf, sc, zp = (torch.index_select(src, 0, item, out=dst[:m]) for src, dst in
                          ((self.w_f, bufs.wf), (self.scale, bufs.sc), (cur, bufs.zp)))
            qu = bufs.qu[:m]
        q = bufs.q[:m]
        torch.mul(wf, sc, out=q)
        q.add_(zp).round_().clamp_(0, self.max_v)
        qu.copy_(q)
        if not isinstance(item, slice):
            self.q.index_copy_(0, item, qu)


class _Buffers:
    """One worker's slice buffers, allocated once."""

    def __init__(self, torch, rows: int, block: int, padded: int):
        f32 = torch.float32
        self.p, self.q, self.x, self.t, self.wf, self.e = (
            torch.empty((rows, block), dtype=f32) for _ in range(6))
        self.sc, self.zp, self.nz, self.re = (torch.empty((rows, 1), dtype=f32) for _ in range(4))
        self.qu = torch.empty((rows, block), dtype=torch.uint8)
        self.pow_a, self.pow_b = torch.empty(padded, dtype=f32), torch.empty(padded, dtype=f32)
