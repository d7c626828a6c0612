"""The perplexity gate through the CLI: a bad recipe is refused (exit 3, nothing written);
``--auto`` keeps the smallest recipe inside the gate; ``export --quant`` writes the card.

The tiny random models are near-uniform on English text, so quantization noise moves
their perplexity by chance. The gate is exercised on a *sharpened* tiny model (its
lm_head weight x6: peaked next-token distributions) evaluated on text it generated
itself, where quantization error shows up as a perplexity rise.
"""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from slmedge.exporter.quantize.graph import analyze, fold_weight_transposes
from slmedge.runtimes.artifact import sha256_file

SLMEDGE = [sys.executable, "-m", "slmedge.tools.cli"]


def _cli(*args):
    return subprocess.run([*SLMEDGE, *map(str, args)], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def sharp(tiny_dir, tmp_path_factory):
    """(artifact dir, eval text) of the sharpened tiny Llama (unfused export)."""
    from slmedge.exporter.pipeline import ExportConfig, run_export
    from slmedge.runtimes.generation import SamplingConfig, generate
    from slmedge.runtimes.sessions.onnx_decoder import OnnxDecoder
    from slmedge.runtimes.tokenizer import TextTokenizer

    root = tmp_path_factory.mktemp("sharp")
    art = root / "fp32"
    run_export(ExportConfig(model=str(tiny_dir("llama")), output=art, fuse=False,
                            quality={"eval_tokens": 256}))
    model = onnx.load(str(art / "model.onnx"))
    fold_weight_transposes(model)  # a tied lm_head gets its own weight to scale
    head = next(n for n in model.graph.node if n.name == analyze(model).lm_head)
    for init in model.graph.initializer:
        if init.name == head.input[1]:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 6, init.name))
    onnx.save(model, str(art / "model.onnx"))
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["files"]["model.onnx"].update(size=(art / "model.onnx").stat().st_size,
                                           sha256=sha256_file(art / "model.onnx"))
    (art / "manifest.json").write_text(json.dumps(manifest))
    decoder, tok = OnnxDecoder(art / "model.onnx"), TextTokenizer(art)
    text = "\n".join(
        tok.decode(generate(decoder, [1, 7 + s], 200,
                            sampling=SamplingConfig(temperature=1.0, seed=s)).tokens)
        for s in range(6))
    (root / "self.txt").write_text(text)
    return art, root / "self.txt"


def test_gate_refuses_a_bad_recipe_and_writes_nothing(sharp, tmp_path):
    art, text = sharp
    out = tmp_path / "int4"
    r = _cli("quantize", art, "-o", out, "--quant", "int4", "--algorithm", "rtn",
             "--eval-text", text, "--eval-tokens", 1024, "--max-ppl-increase", 5, "--json")
    assert r.returncode == 3, r.stderr
    assert "quality gate failed" in r.stderr and "perplexity" in r.stderr
    assert "+5%" in r.stderr  # the limit is in the message, with the figures
    error = json.loads(r.stdout)["error"]  # --json: the failure is the one document on stdout
    assert error["exit_code"] == 3 and error["type"] == "QualityGateFailed"
    assert error["command"] == "quantize" and "+5%" in error["message"]
    assert error["figures"]["max_ppl_increase"] == 5
    assert [t["ppl_increase_pct"] > 5 for t in error["figures"]["tried"]] == [True]
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no staging or candidate files left behind


def test_auto_keeps_the_smallest_recipe_inside_the_gate(sharp, tmp_path):
    art, text = sharp
    out = tmp_path / "auto"
    # the perplexity criterion alone: the sharpened logits magnify every candidate's mean KL
    # (0.3 and more on this model), which the default --max-kl-mean would refuse
    r = _cli("quantize", art, "-o", out, "--quant", "int4", "--algorithm", "rtn", "--auto",
             "--eval-text", text, "--max-kl-mean", 10, "--min-top1-agreement", 0,
             "--eval-tokens", 1024, "--max-ppl-increase", 0.3, "--json")
    assert r.returncode == 0, r.stderr
    manifest = json.loads(r.stdout)
    tried = manifest["gate"]["tried"]
    assert len(tried) >= 2  # the smallest candidate was over the gate here
    assert all(not t["passed"] for t in tried[:-1]) and tried[-1]["passed"]
    assert all(t["ppl_increase_pct"] > 0.3 for t in tried[:-1])
    sizes = [t["estimated_mb"] for t in tried]
    assert sizes == sorted(sizes)
    assert manifest["quantization"]["label"] == tried[-1]["label"]
    assert manifest["quality"]["ppl_increase_pct"] <= 0.3
    assert "--auto tried" not in r.stdout  # --json: one JSON document only
    files = sorted(p.name for p in out.iterdir())
    assert "model.onnx" in files and not any(f.startswith("candidate") for f in files)
    # provenance: the fp32 artifact it came from
    assert manifest["derived_from"]["model_sha256"] == sha256_file(art / "model.onnx")


def test_export_with_quant_writes_card_recipe_and_decisions(tiny_dir, tmp_path):
    from slmedge.exporter.pipeline import ExportConfig, run_export

    out = tmp_path / "q"
    manifest = run_export(ExportConfig(
        model=str(tiny_dir("qwen2")), output=out,
        quant={"scheme": "int8"}, quality={"eval_tokens": 600, "max_ppl_increase": 50},
    ))
    assert manifest["recipe"]["quant"] == "int8-nbits-b32-head8"
    q = manifest["quality"]
    for key in ("perplexity", "reference_perplexity", "ppl_increase_pct", "kl_mean",
                "top1_agreement_eval", "greedy"):
        assert key in q
    assert q["greedy"]["prompts"] > 0 and 0 <= q["greedy"]["top1_agreement"] <= 1
    assert manifest["quantization"]["op_decisions"]["MatMulNBits"]["quantized"] > 0
    assert "com.microsoft.MatMulNBits" in manifest["onnx"]["contrib_ops"]
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".onnx", ".data")) == ["model.onnx"]
    ids = np.arange(10, 30).tolist()
    from slmedge.runtimes.sessions.onnx_decoder import OnnxDecoder

    assert np.isfinite(OnnxDecoder(out / "model.onnx").logits(ids)).all()


def test_fp32_export_card_has_perplexity(tiny_artifact):
    manifest = json.loads((tiny_artifact("llama") / "manifest.json").read_text())
    card = manifest["quality"]
    assert card["perplexity"] > 1 and card["reference"] == "self"
    assert card["eval"]["tokens"] > 100 and "text_sha256" in card["eval"]


def test_quant_flags_without_quant_is_a_usage_error(tiny_artifact, tmp_path):
    r = _cli("export", "--model", "x", "--output", tmp_path / "o", "--block-size", "64")
    assert r.returncode == 2 and "need --quant" in r.stderr
