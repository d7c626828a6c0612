"""The streaming quantizer's memory is bounded by a few tensors, not by the model.

A 320 MB fp32 graph (20 residual MatMul layers of 2048 x 2048 and a head, weights in an
external-data file) is quantized in a child process, which reads its own peak resident
memory from the OS (``getrusage``) once the modules and ONNX Runtime's kernels are loaded
(its baseline) and again after ``quantize_file_streaming``. Deterministic: seeded weights,
memory figures only (no timing).
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from slmedge.exporter.quantize.external_data import DataFileWriter

K = 2048
LAYERS = 20
SCALE = np.float32(0.5 / np.sqrt(K))


def _weight(i: int, k: int = K) -> np.ndarray:
    return (np.random.default_rng(1000 + i).standard_normal((k, k), dtype=np.float32) * SCALE)


def write_residual_mlp(path: Path, layers: int, k: int = K) -> int:
    """``h = h + h @ W_i`` for each layer, then ``logits = h @ W_head``; weights written one
    at a time to ``<path>.data``. Returns the bytes of weights."""
    nodes, inits = [], []
    h = "x"
    with DataFileWriter(path.with_name(path.name + ".data")) as data:
        for i in range(layers + 1):
            w = _weight(i, k)
            inits.append(data.add_array(f"model.layers.{i}.w", w))
            del w
            if i == layers:
                nodes.append(helper.make_node("MatMul", [h, f"model.layers.{i}.w"], ["logits"],
                                              name="lm_head/MatMul"))
                break
            nodes += [
                helper.make_node("MatMul", [h, f"model.layers.{i}.w"], [f"d{i}"],
                                 name=f"model.layers.{i}.mlp/MatMul"),
                helper.make_node("Add", [h, f"d{i}"], [f"h{i}"], name=f"model.layers.{i}/Add"),
            ]
            h = f"h{i}"
        total = data.bytes_written
    graph = helper.make_graph(
        nodes, "residual", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, k])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save_model(model, str(path))
    return total


CHILD = r"""
import json, resource, sys
from pathlib import Path
sys.path.insert(0, sys.argv[4])
from test_streaming_memory import write_residual_mlp
from slmedge.exporter.quantize.recipe import QuantRecipe
from slmedge.exporter.quantize.streaming import quantize_file_streaming

recipe = QuantRecipe(scheme="int4", algorithm="rtn")
warm = Path(sys.argv[3])
write_residual_mlp(warm / "warm.onnx", 1, 64)   # load every module and kernel once
quantize_file_streaming(warm / "warm.onnx", warm / "warm-q.onnx", recipe)
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
quantize_file_streaming(Path(sys.argv[1]), Path(sys.argv[2]), recipe)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"baseline_kb": baseline, "peak_kb": peak}))
"""


def test_peak_memory_is_a_few_tensors_not_the_model(tmp_path):
    src = tmp_path / "src" / "model.onnx"
    src.parent.mkdir()
    weights = write_residual_mlp(src, LAYERS)
    assert weights == (LAYERS + 1) * K * K * 4  # 352 MB of fp32 weights
    dst = tmp_path / "q" / "model.onnx"
    dst.parent.mkdir()
    (tmp_path / "warm").mkdir()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(src), str(dst), str(tmp_path / "warm"),
         str(Path(__file__).parent)],
        capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    grew = (figures["peak_kb"] - figures["baseline_kb"]) * 1024
    tensor = K * K * 4
    # one fp32 weight is 16.8 MB: reading, quantizing and writing one at a time stays within
    # a few of them; the whole model is 21 of them
    assert grew < 0.4 * weights, figures
    assert grew < 6 * tensor, figures
    print(f"streaming int4 of {weights / 1e6:.0f} MB: peak RSS {figures['peak_kb'] / 1e3:.0f} MB, "
          f"{grew / 1e6:.0f} MB above the {figures['baseline_kb'] / 1e3:.0f} MB baseline")

    # and the output is the model, quantized: int4 body, int8 head, all in the data file
    import onnxruntime as ort

    q = onnx.load(str(dst), load_external_data=False)
    bits = [a.i for n in q.graph.node if n.op_type == "MatMulNBits"
            for a in n.attribute if a.name == "bits"]
    assert bits == [4] * LAYERS + [8]
    assert (dst.parent / "model.onnx.data").stat().st_size < weights / 5
    x = np.random.default_rng(7).standard_normal((1, K), dtype=np.float32)
    want = x
    for i in range(LAYERS):
        want = want + want @ _weight(i)
    want = want @ _weight(LAYERS)
    got = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    cos = float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want))
    # 20 int4 layers of Gaussian weights, block 32: 0.988 here; a wrong layout is ~0
    assert cos > 0.97, cos
