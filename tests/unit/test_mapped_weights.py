"""A tied 8-bit table held once at run time (issue 15, "Runtime memory").

The lookup reads the lm_head's ``[N, K / bs, bs]`` bytes as stored (``tied_table``), the
weights stay in ``model.onnx.data``, which ONNX Runtime memory-maps, and after the session is
built the runtime drops the mapped pages nothing wrote (``release_mapped_weights``): what
stays resident is the head's pre-packed copy, not the table a second time. RSS is read from
the OS in fresh processes; no timing."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from slmedge.exporter.quantize.tied_table import looks_up_head_bytes, share_tied_nbits_table

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps")

MB = 1 << 20


def _run(script: str, *args) -> dict:
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# Maps three files as ONNX Runtime maps external data (private, read-write) and reads every
# page; writes one byte into the second; the third lies outside the released directory.
_MAPS = """
import json, mmap, sys
from pathlib import Path
from slmedge.runtimes.bench.runner import rss_mb
from slmedge.runtimes.sessions.onnx_decoder import release_mapped_weights
inside, outside = Path(sys.argv[1]), Path(sys.argv[2])
maps = {}
for path in (inside / "a.data", inside / "b.data", outside / "c.data"):
    with open(path, "rb") as f:
        maps[path.name] = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE,
                                    prot=mmap.PROT_READ | mmap.PROT_WRITE)
sums = {n: sum(m[i] for i in range(0, len(m), 4096)) for n, m in maps.items()}
maps["b.data"][0] = 255
held = rss_mb()
released = release_mapped_weights(inside)
after = rss_mb()
again = {n: sum(m[i] for i in range(0, len(m), 4096)) for n, m in maps.items()}
print(json.dumps({"held": held, "after": after, "released": released, "sums": sums,
                  "again": again, "b0": maps["b.data"][0]}))
"""


def test_release_mapped_weights_drops_only_clean_pages_of_the_directory(tmp_path):
    inside, outside = tmp_path / "model", tmp_path / "other"
    inside.mkdir()
    outside.mkdir()
    rng = np.random.default_rng(0)
    for path in (inside / "a.data", inside / "b.data", outside / "c.data"):
        path.write_bytes(rng.integers(0, 255, 64 * MB, dtype=np.uint8).tobytes())
    got = _run(_MAPS, inside, outside)
    assert got["released"] == 64 * MB  # a.data only: b.data has a written page
    assert got["held"] - got["after"] >= 60, got  # 10^6 bytes, of a.data's 67
    assert got["again"]["a.data"] == got["sums"]["a.data"]  # read back from the file
    assert got["b0"] == 255  # the written page is kept


def _tied_model(n: int, k: int, bs: int = 128, bits: int = 8,
                zero_points: bool = True) -> onnx.ModelProto:
    """A lookup ``Gather`` and a tied 8-bit or 4-bit ``MatMulNBits`` lm_head over random
    bytes (4 bits: two values a byte, zero points two blocks a byte)."""
    rng = np.random.default_rng(0)
    blocks = k // bs
    zp = (rng.integers(100, 156, (n, blocks), dtype=np.uint8) if bits == 8
          else rng.integers(0, 256, (n, blocks // 2), dtype=np.uint8))
    inits = [
        numpy_helper.from_array(rng.integers(0, 256, (n, blocks, bs * bits // 8),
                                             dtype=np.uint8), "head_q"),
        numpy_helper.from_array(rng.random((n, blocks), dtype=np.float32) / 64, "head_scales"),
        numpy_helper.from_array(np.zeros((1, k), np.float32), "unused_table"),
    ]
    head_inputs = ["hidden", "head_q", "head_scales"]
    if zero_points:
        inits.append(numpy_helper.from_array(zp, "head_zp"))
        head_inputs.append("head_zp")
    nodes = [helper.make_node("Gather", ["unused_table", "input_ids"], ["embeds"], name="embed"),
             helper.make_node("MatMulNBits", head_inputs,
                              ["logits"], name="lm_head", domain="com.microsoft", K=k, N=n,
                              bits=bits, block_size=bs, accuracy_level=4)]
    graph = helper.make_graph(
        nodes, "tied",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "seq"]),
         helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, "seq", k])],
        [helper.make_tensor_value_info("embeds", TensorProto.FLOAT, [1, "seq", k]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "seq", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid("com.microsoft", 1)])
    assert share_tied_nbits_table(model, "embed", "logits")
    keep = [t for t in model.graph.initializer if t.name != "unused_table"]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return model


def test_the_8bit_lookup_reads_the_heads_bytes_as_stored():
    model = _tied_model(64, 256, bs=32)
    assert looks_up_head_bytes(model)
    # the head's bytes, scales and zero points are read as stored: no node computes from
    # initializers alone (ONNX Runtime would fold it into a private copy at load)
    inits = {t.name for t in model.graph.initializer}
    assert not [n.name for n in model.graph.node if all(i in inits for i in n.input if i)]
    read = {i for n in model.graph.node if n.op_type == "Gather" for i in n.input}
    assert {"head_q", "head_scales", "head_zp"} <= read
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([[0, 7, 63]], np.int64)
    eye = np.eye(256, dtype=np.float32)[None]
    rows, weight = session.run(None, {"input_ids": ids, "hidden": eye})
    # the lookup's rows are the head's dequantized rows (MatMulNBits of the identity), exactly
    np.testing.assert_allclose(rows[0], weight[0].T[ids[0]], rtol=0, atol=1e-6)
    q = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "head_q"))
    s = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "head_scales"))
    z = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "head_zp"))
    want = ((q.astype(np.float32) - z[..., None]) * s[..., None]).reshape(64, 256)
    np.testing.assert_allclose(rows[0], want[ids[0]], rtol=1e-6, atol=1e-7)



def _nibbles(packed: np.ndarray) -> np.ndarray:
    """``[.., m]`` bytes -> ``[.., 2m]`` 4-bit values, low nibble first (MatMulNBits)."""
    return np.stack([packed & 15, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)


@pytest.mark.parametrize("zero_points", [True, False], ids=["zero-points", "symmetric"])
def test_the_4bit_lookup_reads_the_heads_bytes_as_stored(zero_points):
    """As the 8-bit one: no Reshape of the head's packed bytes, scales or zero points (ONNX
    Runtime folded those into private copies: 87 MB at Qwen2.5-0.5B's shapes); the nibbles
    are unpacked after the Gather and the rows are the head's own."""
    model = _tied_model(64, 256, bs=32, bits=4, zero_points=zero_points)
    assert looks_up_head_bytes(model)
    inits = {t.name for t in model.graph.initializer}
    assert not [n.name for n in model.graph.node if all(i in inits for i in n.input if i)]
    assert not [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([[0, 7, 63, 7]], np.int64)
    eye = np.eye(256, dtype=np.float32)[None]
    rows, weight = session.run(None, {"input_ids": ids, "hidden": eye})
    np.testing.assert_allclose(rows[0], weight[0].T[ids[0]], rtol=0, atol=1e-6)
    get = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    q = _nibbles(get["head_q"]).astype(np.float32)  # [64, 8, 32]
    z = _nibbles(get["head_zp"]).astype(np.float32) if zero_points else np.full((64, 8), 8.0)
    want = ((q - z[..., None]) * get["head_scales"][..., None]).reshape(64, 256)
    np.testing.assert_allclose(rows[0], want[ids[0]], rtol=1e-6, atol=1e-7)

# The bench's steps: RSS, open the session the runtime's way, RSS again.
_LOAD = """
import json, sys
from slmedge.runtimes.bench.runner import rss_mb
from slmedge.runtimes.sessions.onnx_decoder import make_session
before = rss_mb()
session = make_session(sys.argv[1], threads=1)
print(json.dumps({"before": before, "after": rss_mb()}))
"""


def test_a_tied_8bit_table_is_resident_once_after_load(tmp_path):
    """134 MB table: the session holds the head's pre-packed copy (~the table's size plus its
    block sums: 159 MB measured), not the table again (through a Reshape of the table, which
    ORT folds into a copy: 293 MB measured, ORT 1.32, x86)."""
    n, k = 131072, 1024
    model = _tied_model(n, k)
    onnx.save_model(model, str(tmp_path / "model.onnx"), save_as_external_data=True,
                    location="model.onnx.data", size_threshold=1024)
    table_mb = n * k / 1e6  # as rss_mb counts
    got = _run(_LOAD, tmp_path / "model.onnx")
    session_mb = got["after"] - got["before"]
    assert session_mb <= 1.3 * table_mb, (session_mb, table_mb)


def _through_reshapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The lookup as it was until 2026-12-07: GatherBlockQuantized over the head's bytes with
    the scales and zero points through Reshapes to [N, nb, 1] (its rank rule)."""
    graph = model.graph
    n, nb, bs = next(t.dims for t in graph.initializer if t.name == "head_q")
    k = nb * bs
    del graph.node[:]
    graph.initializer.extend([
        numpy_helper.from_array(np.array([n, nb, 1], np.int64), "block_shape"),
        numpy_helper.from_array(np.array([0, 0, k], np.int64), "row_shape")])
    graph.node.extend([
        helper.make_node("Reshape", ["head_scales", "block_shape"], ["s3"]),
        helper.make_node("Reshape", ["head_zp", "block_shape"], ["z3"]),
        helper.make_node("GatherBlockQuantized", ["head_q", "input_ids", "s3", "z3"], ["blocks"],
                         domain="com.microsoft", gather_axis=0, quantize_axis=2, block_size=bs,
                         bits=8),
        helper.make_node("Reshape", ["blocks", "row_shape"], ["embeds"]),
        helper.make_node("MatMulNBits", ["hidden", "head_q", "head_scales", "head_zp"],
                         ["logits"], name="lm_head", domain="com.microsoft", K=k, N=n, bits=8,
                         block_size=bs, accuracy_level=4)])
    return model


def test_the_lookups_scales_and_zero_points_are_not_copied_at_load(tmp_path):
    """Block 32 (Qwen2.5-0.5B's head: 17 MB of scales, 4 MB of zero points): read as stored
    by plain Gathers, they stay the file's mapped pages; through Reshapes (what the lookup did
    before, GatherBlockQuantized wants them as [N, nb, 1]) ORT folds them into private copies
    at load, ~their size more RSS. Same rows both ways."""
    n, k, bs = 131072, 1024, 32
    sizes = n * (k // bs) * (4 + 1) / 1e6  # fp32 scales + uint8 zero points, as rss_mb counts
    session = {}
    for name, model in (("now", _tied_model(n, k, bs)),
                        ("reshaped", _through_reshapes(_tied_model(n, k, bs)))):
        (tmp_path / name).mkdir()
        onnx.save_model(model, str(tmp_path / name / "model.onnx"), save_as_external_data=True,
                        location="model.onnx.data", size_threshold=1024)
        got = _run(_LOAD, tmp_path / name / "model.onnx")
        session[name] = got["after"] - got["before"]
    assert session["now"] <= session["reshaped"] - 0.75 * sizes, (session, sizes)
    import onnxruntime as ort

    ids = np.array([[0, 5, n - 1]], np.int64)
    hidden = np.zeros((1, 3, k), np.float32)
    rows = [ort.InferenceSession(str(tmp_path / name / "model.onnx"),
                                 providers=["CPUExecutionProvider"]).run(
        ["embeds"], {"input_ids": ids, "hidden": hidden})[0] for name in ("now", "reshaped")]
    np.testing.assert_array_equal(rows[0], rows[1])
