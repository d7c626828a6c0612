"""One MatMulNBits node with fixed random weights and activations, and a numpy reference.

``write_cases(dir)`` (host: needs ``onnx``) writes one model per (accuracy level, zero points)
and ``inputs.npy`` / ``reference.npy``; ``run_cases(dir)`` (any machine: onnxruntime + numpy
only) runs them and returns the outputs. ``python matmulnbits_case.py DIR`` runs them and writes
``DIR/out-<machine>.npz`` (what the emulated arm64 target executes).
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import numpy as np

M, K, N, BLOCK = 8, 512, 256, 32
LEVELS = (0, 1, 4)


def _quantized(rng: np.random.Generator, zero_points: bool):
    blocks = K // BLOCK
    q = rng.integers(0, 16, size=(N, blocks, BLOCK), dtype=np.uint8)
    scales = rng.uniform(0.005, 0.02, size=(N, blocks)).astype(np.float32)
    zp = (rng.integers(0, 16, size=(N, blocks), dtype=np.uint8) if zero_points
          else np.full((N, blocks), 8, dtype=np.uint8))
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)  # [N, blocks, BLOCK/2]
    zp_cols = np.zeros((N, (blocks + 1) // 2), dtype=np.uint8)
    for b in range(blocks):
        zp_cols[:, b // 2] |= zp[:, b] << (4 * (b % 2))
    # float64 reference weight [K, N]
    w = ((q.astype(np.float64) - zp[..., None]) * scales[..., None].astype(np.float64))
    return packed, scales, zp_cols, w.reshape(N, K).T


def write_cases(out: Path, seed: int = 18) -> list[str]:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    # activations like a decoder's hidden state: mostly small, a few large outliers per row
    a = rng.normal(0.0, 1.0, size=(M, K)).astype(np.float32)
    a[:, rng.choice(K, 4, replace=False)] *= 20.0
    np.save(out / "inputs.npy", a)
    names = []
    for zero_points in (False, True):
        packed, scales, zp_cols, w = _quantized(np.random.default_rng(seed + zero_points),
                                                zero_points)
        np.save(out / f"reference-zp{int(zero_points)}.npy", a.astype(np.float64) @ w)
        for level in LEVELS:
            inits = [numpy_helper.from_array(packed, "B"),
                     numpy_helper.from_array(scales.reshape(-1), "scales")]
            inputs = ["A", "B", "scales"]
            if zero_points:
                inits.append(numpy_helper.from_array(zp_cols.reshape(-1), "zero_points"))
                inputs.append("zero_points")
            node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft",
                                    K=K, N=N, bits=4, block_size=BLOCK, accuracy_level=level)
            graph = helper.make_graph(
                [node], "one_matmulnbits",
                [helper.make_tensor_value_info("A", TensorProto.FLOAT, [M, K])],
                [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [M, N])], inits)
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                            helper.make_opsetid("com.microsoft", 1)])
            model.ir_version = 8
            name = f"level{level}-zp{int(zero_points)}"
            onnx.save(model, str(out / f"{name}.onnx"))
            names.append(name)
    return names


def run_cases(directory: Path) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    a = np.load(directory / "inputs.npy")
    outs = {}
    for path in sorted(directory.glob("level*.onnx")):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        outs[path.stem] = sess.run(None, {"A": a})[0]
    return outs


def errors(directory: Path, outs: dict[str, np.ndarray]) -> dict[str, float]:
    """Max abs difference from the float64 reference, per case."""
    refs = {zp: np.load(directory / f"reference-zp{zp}.npy") for zp in (0, 1)}
    return {name: float(np.abs(y - refs[int(name[-1])]).max()) for name, y in outs.items()}


if __name__ == "__main__":
    d = Path(sys.argv[1])
    result = run_cases(d)
    np.savez(d / f"out-{sys.argv[2] if len(sys.argv) > 2 else platform.machine()}.npz", **result)
