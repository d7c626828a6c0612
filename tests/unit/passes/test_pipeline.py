"""The pipeline on a file: counts per fusion, the file rewritten, values unchanged."""

import json

import numpy as np
import pytest
import onnx_ir as ir
from pass_graphs import F, model, run
from test_rms_norm import D, _inits, _rms_nodes

from slmedge.exporter.passes import fuse_onnx_file
from slmedge.runtimes.errors import EXIT_USAGE
from slmedge.tools.cli.app import main


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
    # The command line (`slmedge fuse`, tools/cli/fuse.py) rewrites in place by default.
    assert main(["fuse", str(path)]) == 0
    assert [n.op_type for n in ir.load(str(path)).graph] == ["SimplifiedLayerNormalization"]


def _rms_file(tmp_path):
    m = model(_rms_nodes("x", "y"), [("x", F, [1, 3, D])], [("y", F, [1, 3, D])], _inits())
    path = tmp_path / "model.onnx"
    ir.save(m, str(path))
    return path


def test_slmedge_fuse_json_prints_the_report_and_writes_output(tmp_path, capsys):
    path = _rms_file(tmp_path)
    before, n_ops = path.read_bytes(), len(ir.load(str(path)).graph)
    assert main(["fuse", str(path), "-o", str(tmp_path / "fused.onnx"), "--json"]) == 0
    out, err = capsys.readouterr()
    doc = json.loads(out)  # exactly one JSON document on stdout
    assert doc["counts"]["SimplifiedLayerNormalization"] == 1
    assert doc["ops_before"] == n_ops > 1 and doc["ops_after"] == 1
    assert f"wrote {tmp_path / 'fused.onnx'}" in err
    assert path.read_bytes() == before  # -o leaves the source alone
    assert main(["fuse", str(path)]) == 0  # without --json: one line per fusion
    out = capsys.readouterr().out
    assert "SimplifiedLayerNormalization" in out and f"{n_ops} -> 1 nodes" in out
    assert "no Softmax" in out  # a fusion that found nothing says why


def test_slmedge_fuse_options_come_from_the_config_then_the_flags(tmp_path):
    from slmedge.tools.cli.app import build_parser
    from slmedge.tools.cli.fuse import _options

    path = _rms_file(tmp_path)
    parse = build_parser().parse_args
    assert _options(parse(["fuse", str(path)])).max_sequence_length == 4096  # no config.json
    (tmp_path / "config.json").write_text(json.dumps({
        "max_position_embeddings": 64, "sliding_window": 16, "num_hidden_layers": 2,
        "layer_types": ["sliding_attention", "full_attention"]}))
    options = _options(parse(["fuse", str(path)]))
    assert (options.max_sequence_length, options.sliding_windows) == (64, {0: 16})
    assert options.logits_to_keep
    options = _options(parse(["fuse", str(path), "--max-sequence-length", "128",
                              "--no-logits-to-keep"]))
    assert (options.max_sequence_length, options.logits_to_keep) == (128, False)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"n_positions": 32}))
    assert _options(parse(["fuse", str(path), "--config", str(other)])).max_sequence_length == 32


@pytest.mark.parametrize("case, message", [
    ("missing model", "no such ONNX file"),
    ("missing config", "--config"),
    ("config not an object", "is not a Hugging Face config.json (a JSON list"),
    ("config not JSON", "is not a Hugging Face config.json"),
    ("output dir missing", "does not exist; create it first"),
])
def test_slmedge_fuse_refuses_bad_input_with_exit_2(tmp_path, capsys, case, message):
    path = _rms_file(tmp_path)
    argv = ["fuse", str(path)]
    if case == "missing model":
        argv = ["fuse", str(tmp_path / "nope.onnx")]
    elif case == "missing config":
        argv += ["--config", str(tmp_path / "nope.json")]
    elif case == "config not an object":
        (tmp_path / "config.json").write_text("[1, 2]")
    elif case == "config not JSON":
        (tmp_path / "config.json").write_text("{max_position_embeddings: 64")
    else:
        argv += ["-o", str(tmp_path / "no" / "fused.onnx")]
    before = path.read_bytes()
    assert main(argv) == EXIT_USAGE
    assert message in capsys.readouterr().err
    assert path.read_bytes() == before  # refused before any work
