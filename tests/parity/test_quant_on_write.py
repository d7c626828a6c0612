"""Quantize on write (issue 15): the streamed export's graph quantized straight from the
checkpoint's lazy weights, no fp32 ``model.onnx(.data)`` written, must give the same files as
today's path (the fp32 graph written by ``save_graph``, then ``quantize_file_streaming`` reading
it back): byte for byte, graph and data, on every tiny architecture and SmolLM2's GGUF.

And ``slmedge export --quant`` takes that path when ONNX Runtime's fp32 verification session
would not fit (``verify_session_max_mb`` forces it here): the manifest says the float graph was
not written and why, the parity gate is recorded as skipped with the sizes, the quality card
compares with the source streamed in PyTorch (streamed_reference.py), and the artifact equals
the one written through the fp32 graph.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers.tiny_models import TINY_MODEL_TYPES

from slmedge.exporter.onnx.graph_writer import graph_without_weights, save_graph
from slmedge.exporter.passes import FusionOptions
from slmedge.exporter.quantize import tied_table
from slmedge.exporter.quantize.external_data import UNWRITTEN, UnwrittenSource
from slmedge.exporter.quantize.recipe import QuantRecipe
from slmedge.exporter.quantize.streaming import quantize_file_streaming
from slmedge.exporter.sources.load import open_source
from slmedge.exporter.onnx.streaming import build_streamed_graph
from slmedge.runtimes.sessions.onnx_decoder import OnnxDecoder

IDS = list(range(6, 40))
RECIPES = {
    "int4-default": dict(scheme="int4"),  # HQQ, float zero points folded
    "int4-rtn-head8-emb8": dict(scheme="int4", algorithm="rtn", lm_head="int8",
                                embedding="int8"),  # the embedding read by rows
    "int8-nbits": dict(scheme="int8"),
}


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.parent.iterdir())}


def fp32_graph(source: str, directory: Path, *, external: bool = False, exact=False):
    """(graph, fp32 path, exact blocks): the traced graph and the fp32 file written from it."""
    streamed = open_source(source, dtype="fp32")
    graph, *_ = build_streamed_graph(
        streamed, fuse_options=FusionOptions.from_hf_config(streamed.model.config))
    blocks = getattr(streamed.weights, "exact_blocks", None) if exact else None
    fp32 = directory / "fp32" / "model.onnx"
    fp32.parent.mkdir()
    save_graph(graph, fp32, external_data=external)
    return graph, fp32, blocks


def quantize_both(traced, tmp_path: Path, recipe: QuantRecipe) -> tuple[Path, Path]:
    """(written, on_write): the quantized model through the written fp32 graph, and straight
    from the lazy weights; one traced graph serves both."""
    graph, fp32, blocks = traced
    written = tmp_path / "written" / "model.onnx"
    written.parent.mkdir()
    want = quantize_file_streaming(fp32, written, recipe, exact=blocks)
    proto, source_ = graph_without_weights(graph)
    on_write = tmp_path / "on_write" / "model.onnx"
    on_write.parent.mkdir()
    before = proto.SerializeToString()
    got = quantize_file_streaming(None, on_write, recipe, exact=blocks, graph=(proto, source_))
    # a copy is quantized: the caller's message (and its protobuf arena) stays as it was
    assert proto.SerializeToString() == before
    for key in ("label", "weight_precision", "embedding", "lm_head", "op_decisions",
                "contrib_ops", "zero_points", "gguf_exact"):
        assert getattr(got, key) == getattr(want, key), key
    return written, on_write


def both_ways(source: str, tmp_path: Path, recipe: QuantRecipe, *, external: bool = False,
              exact=False) -> tuple[Path, Path]:
    """:func:`quantize_both` on a graph traced for this call."""
    return quantize_both(fp32_graph(source, tmp_path, external=external, exact=exact),
                         tmp_path, recipe)


@pytest.fixture(scope="module")
def traced(tiny_dir, tmp_path_factory):
    """``traced(model_type)``: one traced graph and fp32 file per architecture, shared by the
    three recipes (CI time: tracing and writing it was most of each case)."""
    cache: dict = {}

    def get(model_type: str):
        if model_type not in cache:
            cache[model_type] = fp32_graph(str(tiny_dir(model_type)),
                                           tmp_path_factory.mktemp(f"fp32-{model_type}"))
        return cache[model_type]

    return get


def assert_identical(written: Path, on_write: Path) -> None:
    a, b = _files(written), _files(on_write)
    assert sorted(a) == sorted(b) == ["model.onnx", "model.onnx.data"]
    for name in a:
        assert a[name] == b[name], f"{name} differs ({len(a[name])} vs {len(b[name])} bytes)"
    np.testing.assert_array_equal(OnnxDecoder(on_write).logits(IDS),
                                  OnnxDecoder(written).logits(IDS))


@pytest.mark.parametrize("name", sorted(RECIPES))
@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_quantize_on_write_is_byte_identical(model_type, name, traced, tmp_path):
    written, on_write = quantize_both(traced(model_type), tmp_path, QuantRecipe(**RECIPES[name]))
    assert_identical(written, on_write)
    # the fp32 weights were never in a file, and quantization changed the model
    assert not (on_write.parent / UNWRITTEN).exists()
    graph = onnx.load(str(on_write), load_external_data=False)
    assert {e.value for t in graph.graph.initializer for e in t.external_data
            if e.key == "location"} == {"model.onnx.data"}


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_large_table_and_external_fp32_graph(model_type, tiny_dir, tmp_path, monkeypatch):
    """The default recipe's large-table branches (tied table compared with the head by
    ``matrix``, an untied table int8 by rows) with the threshold lowered to the tiny tables,
    against an fp32 graph written with external data (how large exports are written)."""
    monkeypatch.setattr(tied_table, "TIED_TABLE_MIN_VALUES", 1)
    recipe = QuantRecipe(scheme="int4", algorithm="rtn", lm_head="int8")
    written, on_write = both_ways(str(tiny_dir(model_type)), tmp_path, recipe, external=True)
    assert_identical(written, on_write)
    model = onnx.load(str(on_write), load_external_data=False)
    if model_type == "gemma3_text":  # tied: the lookup reads the head's 8-bit bytes as stored
        assert tied_table.looks_up_head_bytes(model)
    else:  # untied: its own int8 table
        assert "GatherBlockQuantized" in [n.op_type for n in model.graph.node]


@pytest.mark.slow
def test_smollm2_gguf_quantize_on_write_is_byte_identical(tmp_path):
    """SmolLM2's GGUF, its own quantized blocks offered (kept where they fit: int8 block 32;
    int4 on write is byte-checked on the six tiny architectures above: CI time)."""
    recipe = dict(scheme="int8")
    written, on_write = both_ways("embedded:smollm2-135m-instruct", tmp_path,
                                  QuantRecipe(**recipe), exact=True)
    assert_identical(written, on_write)


def test_unwritten_source_checks_what_it_computes():
    tensor = onnx.TensorProto(name="w", data_type=onnx.TensorProto.FLOAT, dims=[2, 3])
    source = UnwrittenSource({"w": lambda: np.zeros((3, 2), np.float32)})
    with pytest.raises(ValueError, match=r"computed float32 \[3, 2\], the graph declares "
                                         r"float32 \[2, 3\]"):
        source.read(tensor)
    with pytest.raises(ValueError, match="never written to a file"):
        source.file_of(tensor)
    other = onnx.TensorProto(name="x", data_type=onnx.TensorProto.FLOAT, dims=[1])
    with pytest.raises(ValueError, match="x is not among the 1 unwritten tensors"):
        source.read(other)
    rows = UnwrittenSource({"w": lambda: np.arange(6, dtype=np.float32).reshape(2, 3)})
    np.testing.assert_array_equal(rows.rows(tensor, 1, 2), [[3, 4, 5]])


# -- the export ------------------------------------------------------------------------------


def _export(tiny_dir, model_type: str, out: Path, **options) -> dict:
    from slmedge.exporter.pipeline import ExportConfig, run_export

    run_export(ExportConfig(model=str(tiny_dir(model_type)), output=out, quant={"scheme": "int4"},
                            quality={"eval_tokens": 64, "new_tokens": 4}, **options))
    return json.loads((out / "manifest.json").read_text())


def test_export_quantizes_on_write_when_the_fp32_session_would_not_fit(tiny_dir, tmp_path):
    from slmedge.runtimes.manifest_schema import Manifest

    written = _export(tiny_dir, "llama", tmp_path / "written")
    on_write = _export(tiny_dir, "llama", tmp_path / "on-write", verify_session_max_mb=0.01)
    assert written["quantization"]["float_graph"] == "written"
    why = on_write["quantization"]["float_graph"]
    assert why.startswith("not written (") and "verify_session_max_mb" in why, why
    # no fp32 graph to run: parity says so, with the sizes
    parity = on_write["verification"]["parity"]
    assert parity["passed"] is None and "needs ~" in parity["skipped"]
    assert "not written" in parity["skipped"]
    # the card compares with the source streamed in PyTorch layer by layer (h2,
    # streamed_reference.py) and the gate applies: the same card as against the fp32 graph
    card, graph_card = on_write["quality"], written["quality"]
    assert graph_card["reference"] == "fp32 graph"
    assert "streamed layer by layer" in card["reference"]
    assert any("no fp32 graph was written" in note for note in card["notes"])
    assert card["greedy"]["generated_by"] == "candidate"
    assert card["perplexity"] == graph_card["perplexity"]  # the same quantized graph
    assert card["reference_perplexity"] == pytest.approx(graph_card["reference_perplexity"],
                                                         rel=1e-4)
    assert card["kl_mean"] == pytest.approx(graph_card["kl_mean"], rel=1e-2)
    assert card["greedy"]["first_divergence"] == graph_card["greedy"]["first_divergence"]
    assert on_write["gate"]["passed"] is True and len(on_write["gate"]["tried"]) == 1
    assert on_write["timings_s"]["quantize_and_card_parts"]["card_reference"] > 0
    Manifest.model_validate(on_write)
    # the same quantized graph as through the written fp32 graph (one file: below 2 GB)
    assert (tmp_path / "on-write" / "model.onnx").read_bytes() == \
        (tmp_path / "written" / "model.onnx").read_bytes()
    assert not any(p.name.endswith(".data") or p.name.startswith(".")
                   for p in (tmp_path / "on-write").iterdir())
    assert written["quantization"]["weight_precision"] == on_write["quantization"][
        "weight_precision"]


def test_auto_keeps_the_written_fp32_graph(tiny_dir, tmp_path):
    """--auto compares each candidate's card with the fp32 graph: it is written even when
    the verification session is said not to fit (recorded as written)."""
    from slmedge.exporter.pipeline import ExportConfig, run_export

    out = tmp_path / "auto"
    run_export(ExportConfig(model=str(tiny_dir("qwen2")), output=out, quant={"scheme": "int4"},
                            verify_session_max_mb=0.01,
                            quality={"eval_tokens": 64, "new_tokens": 4, "auto": True,
                                     "max_kl_mean": 10, "min_top1_agreement": 0}))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization"]["float_graph"] == "written"
    assert manifest["gate"]["passed"] is True
