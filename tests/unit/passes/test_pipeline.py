"""The pipeline on a file: counts per fusion, the file rewritten, values unchanged."""

import json

import numpy as np
import onnx_ir as ir
from pass_graphs import F, model, run
from test_rms_norm import D, _inits, _rms_nodes

from slmedge.exporter.passes import fuse_onnx_file
from slmedge.exporter.passes.__main__ import main


def test_fuse_onnx_file_reports_counts_and_keeps_values(tmp_path):
    m = model(_rms_nodes("x", "y"), [("x", F, [1, 3, D])], [("y", F, [1, 3, D])], _inits())
    path = tmp_path / "model.onnx"
    ir.save(m, str(path))
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 64}))
    x = np.random.default_rng(0).standard_normal((1, 3, D)).astype(np.float32)
    want = run(m, {"x": x})[0]
    report = fuse_onnx_file(path, tmp_path / "fused.onnx")
    assert report.counts["SimplifiedLayerNormalization"] == 1
    assert report.counts["GroupQueryAttention"] == 0
    assert "no Softmax" in report.notes["GroupQueryAttention"][0]
    fused = ir.load(str(tmp_path / "fused.onnx"))
    assert [n.op_type for n in fused.graph] == ["SimplifiedLayerNormalization"]
    np.testing.assert_allclose(run(fused, {"x": x})[0], want, atol=1e-5)
    # The command-line entry point rewrites in place and prints the same report.
    assert main([str(path)]) == 0
    assert [n.op_type for n in ir.load(str(path)).graph] == ["SimplifiedLayerNormalization"]
