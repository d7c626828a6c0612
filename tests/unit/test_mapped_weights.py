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


def _tied_model(n: int, k: int, bs: int = 128) -> onnx.ModelProto:
    """A lookup ``Gather`` and a tied 8-bit ``MatMulNBits`` lm_head over random bytes."""
    rng = np.random.default_rng(0)
    blocks = k // bs
    inits = [
        numpy_helper.from_array(rng.integers(0, 255, (n, blocks, bs), dtype=np.uint8), "head_q"),
        numpy_helper.from_array(rng.random((n, blocks), dtype=np.float32) / 64, "head_scales"),
        numpy_helper.from_array(rng.integers(100, 156, (n, blocks), dtype=np.uint8), "head_zp"),
        numpy_helper.from_array(np.zeros((1, k), np.float32), "unused_table"),
    ]
    nodes = [helper.make_node("Gather", ["unused_table", "input_ids"], ["embeds"], name="embed"),
             helper.make_node("MatMulNBits", ["hidden", "head_q", "head_scales", "head_zp"],
                              ["logits"], name="lm_head", domain="com.microsoft", K=k, N=n,
                              bits=8, block_size=bs, accuracy_level=4)]
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
    gbq = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    assert gbq.input[0] == "head_q" and looks_up_head_bytes(model)
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
