"""hqq.py gives the bytes ONNX Runtime's HQQWeightOnlyQuantizer writes (packed weights, scales,
float zero points), on fp32 and fp16 weights, 4 and 8 bits, several block sizes, with
constant blocks (zero range), an outlier row, spikes (the shrink's pow path) and negative zeros; the
cases reach every path of hqq.py (recomputing changed rows only, the skipped shrink, the
shrink on selected rows, the final rounding of gathered rows)."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from slmedge.exporter.quantize.hqq import hqq_quantize


def _ort_hqq(w: np.ndarray, bits: int, block: int) -> dict[str, np.ndarray]:
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="m")
    config = mnq.HQQWeightOnlyQuantConfig(block_size=block, bits=bits,
                                          op_types_to_quantize=("MatMul",))
    graph = onnx.GraphProto(initializer=[numpy_helper.from_array(w, "w")])
    mnq.HQQWeightOnlyQuantizer(config).quantize(node, [graph])
    return {t.name: numpy_helper.to_array(t) for t in graph.initializer}


CASES = [
    ((256, 384), 4, 32, np.float32, False),  # more rows than one slice (hqq.SLICE_VALUES)
    ((256, 384), 4, 32, np.float32, True),
    ((384, 96), 4, 64, np.float16, True),
    ((128, 40), 8, 32, np.float32, False),
    ((64, 24), 4, 16, np.float32, True),
    ((256, 48), 4, 128, np.float32, False),
    ((96, 50), 4, 16, np.float32, False),    # an odd number of rows per slice at block 16
]


def _weight(shape, dtype, negative_zeros):
    rng = np.random.default_rng(7)
    w = (rng.standard_normal(shape) * 0.02).astype(dtype)
    w[:, 0] = 0.25  # constant blocks: zero range
    w[3, :] *= 40  # an outlier row
    w[5, ::3] = 8.0  # spikes: blocks whose errors stay above the shrink's bound
    if negative_zeros:  # a block of them, and some in mixed blocks
        w[32:64, 1] = -0.0
        w[20:25, 2] = -0.0
    return w


@pytest.mark.parametrize("shape,bits,block,dtype,negative_zeros", CASES)
def test_same_bytes_as_onnxruntime(shape, bits, block, dtype, negative_zeros, monkeypatch):
    import slmedge.exporter.quantize.hqq as hqq

    monkeypatch.setattr(hqq, "SLICE_VALUES", 2048)  # many slices, uneven last one
    w = _weight(shape, dtype, negative_zeros)
    ref = _ort_hqq(w, bits, block)
    packed, scales, zero_points = hqq_quantize(w, bits, block)
    assert packed.dtype == np.uint8 and packed.shape == ref[f"w_Q{bits}"].shape
    assert np.array_equal(packed, ref[f"w_Q{bits}"])
    assert scales.dtype == ref["w_scales"].dtype and scales.tobytes() == ref["w_scales"].tobytes()
    assert zero_points.dtype == ref["w_zero_points"].dtype
    assert zero_points.tobytes() == ref["w_zero_points"].tobytes()


def test_the_cases_reach_every_path(monkeypatch):
    """The byte comparisons above mean something for each shortcut of hqq.py only if one of
    their cases takes it."""
    import slmedge.exporter.quantize.hqq as hqq

    monkeypatch.setattr(hqq, "SLICE_VALUES", 2048)
    seen = set()
    iterate, shrink, round_ = (hqq._Optimizer._iterate, hqq._Optimizer._shrink,
                               hqq._Optimizer._round)

    def spy_iterate(self, item, bufs, cur, nxt, inv_beta, bound):
        iterate(self, item, bufs, cur, nxt, inv_beta, bound)
        gathered = not isinstance(item, slice)
        re = bufs.re[:item.numel()] if gathered else self.row_err[item]
        seen.add("gathered rows" if gathered else "row slices")
        if float(re.max()) < bound:
            seen.add("shrink skipped, -0.0 kept" if self.literal else "shrink skipped")

    def spy_shrink(self, e, sel, t, bufs, inv_beta):
        seen.add("shrink on some rows" if sel.numel() < e.shape[0] else "shrink on all rows")
        shrink(self, e, sel, t, bufs, inv_beta)

    def spy_round(self, item, bufs, cur):
        seen.add("final rounding of " + ("row slices" if isinstance(item, slice) else "rows"))
        round_(self, item, bufs, cur)

    monkeypatch.setattr(hqq._Optimizer, "_iterate", spy_iterate)
    monkeypatch.setattr(hqq._Optimizer, "_shrink", spy_shrink)
    monkeypatch.setattr(hqq._Optimizer, "_round", spy_round)
    for shape, bits, block, dtype, negative_zeros in CASES:
        hqq.hqq_quantize(_weight(shape, dtype, negative_zeros), bits, block)
    assert seen >= {"gathered rows", "row slices", "shrink skipped", "shrink skipped, -0.0 kept",
                    "shrink on some rows", "final rounding of rows"}, seen


def test_rows_under_the_shrink_are_recomputed_every_iteration(monkeypatch):
    """A row whose zero point did not change is skipped only if its errors are below the
    shrink's bound: the shrink depends on beta, which grows every iteration."""
    import torch

    import slmedge.exporter.quantize.hqq as hqq

    monkeypatch.setattr(hqq, "SLICE_VALUES", 2048)
    checked = []
    map_ = hqq._Optimizer._map

    def spy_map(self, pool, fn, items, *args):
        if fn == self._iterate and items and not isinstance(items[0], slice):
            bound = args[-1]
            covered = torch.zeros(self.w_f.shape[0], dtype=torch.bool)
            for item in items:
                covered[item] = True
            shrunk = (self.row_err.view(-1) < bound).logical_not_()
            assert bool(covered[shrunk].all())
            checked.append(int(shrunk.sum()))
        map_(self, pool, fn, items, *args)

    monkeypatch.setattr(hqq._Optimizer, "_map", spy_map)
    hqq.hqq_quantize(_weight((256, 384), np.float32, False), 4, 32)
    assert checked and min(checked) > 0  # the outlier row's blocks are under the shrink


@pytest.mark.parametrize("iteration", [0, 10, 19])
def test_shrink_is_zero_below_the_bound(iteration):
    """hqq.py skips ``relu(|x| - pow(|x| + 1e-8, p - 1) / beta)`` below ``shrink_bound``:
    torch's own float32 ops give exactly 0 up to it, and not far above it."""
    import torch

    from slmedge.exporter.quantize import hqq

    inv_beta = 1.0 / (hqq.BETA * hqq.KAPPA ** iteration)
    bound = hqq.shrink_bound(inv_beta)
    a = torch.cat([torch.linspace(0, bound, 200_001), torch.tensor([0.0, 1e-30, 1e-8])])
    a = a[a < bound]

    def shrink(a):
        t = torch.add(a, 1e-8).pow_(hqq.LP_NORM - 1).mul_(inv_beta)
        return torch.sub(a, t).relu_()

    assert torch.count_nonzero(shrink(a)) == 0
    crossing = bound / hqq.SHRINK_MARGIN
    assert bool((shrink(torch.tensor([crossing * 1.001, crossing * 1.1])) > 0).all())


def test_dequantized_weights_are_close_to_the_input():
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((128, 16)) * 0.02).astype(np.float32)
    packed, scales, zp = hqq_quantize(w, 4, 32)
    q = np.stack([packed & 15, packed >> 4], axis=-1).reshape(16, 128).astype(np.float32)
    deq = (q.reshape(16, 4, 32) - zp.reshape(16, 4, 1)) * scales.reshape(16, 4, 1)
    err = np.abs(deq.reshape(16, 128).T - w)
    assert err.max() < np.abs(w).max() / 7  # within about one step of a 16-level grid


def test_refuses_what_it_does_not_do():
    with pytest.raises(ValueError, match="multiple of the block"):
        hqq_quantize(np.zeros((40, 8), np.float32), 4, 32)
    with pytest.raises(ValueError, match="more than one block"):
        hqq_quantize(np.zeros((32, 8), np.float32), 4, 32)
