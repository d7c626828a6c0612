"""Pure helpers of tools/bench/bench_anchors.py and tools/bench/anchors/prepare_hf.py
(no models, no venvs).

Speeds are never asserted: they depend on the machine and its load.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from helpers.bench_scripts import bench_anchors as ba

REPO = Path(__file__).resolve().parents[2]


def _load_prepare_hf():
    spec = importlib.util.spec_from_file_location(
        "prepare_hf", REPO / "tools" / "bench" / "anchors" / "prepare_hf.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_summarize_median_min_max():
    s = ba.summarize([3.0, 1.0, 2.0, 10.0])
    assert s == {"median": 2.5, "min": 1.0, "max": 10.0, "runs": [3.0, 1.0, 2.0, 10.0]}
    assert ba.summarize([7.0])["median"] == 7.0
    with pytest.raises(ValueError):
        ba.summarize([])


def test_leading_agreement():
    assert ba.leading_agreement([1, 2, 3], [1, 2, 3]) == 3
    assert ba.leading_agreement([1, 2, 9, 4], [1, 2, 3, 4]) == 2
    assert ba.leading_agreement([5], [1]) == 0
    assert ba.leading_agreement([1, 2], [1, 2, 3]) == 2


def test_ratio():
    assert ba.ratio(30.0, 20.0) == 1.5
    assert ba.ratio(None, 2.0) is None
    assert ba.ratio(1.0, 0.0) is None
    assert ba.ratio(1.0, None) is None


def test_parse_tools():
    assert ba.parse_tools("pytorch, slmedge") == ["pytorch", "slmedge"]
    with pytest.raises(ValueError, match="unknown tool.*llamacpp.*slmedge,pytorch,optimum"):
        ba.parse_tools("slmedge,llamacpp")
    with pytest.raises(ValueError, match="twice"):
        ba.parse_tools("slmedge,slmedge")
    with pytest.raises(ValueError):
        ba.parse_tools(" , ")


def _runs(ttft, tps, rss, size):
    return [
        {
            "ttft_ms": t,
            "decode_tokens_per_s": d,
            "peak_rss_mb": rss,
            "load_s": 1.0,
            "model_size_mb": size,
        }
        for t, d in zip(ttft, tps, strict=False)
    ]


def test_summarize_tool_ratios_and_table():
    base = ba.summarize_tool(_runs([100, 110, 90], [40, 44, 36], 300.0, 540.0), None)
    slm = ba.summarize_tool(_runs([100, 110, 90], [40, 44, 36], 300.0, 540.0), base)
    pt = ba.summarize_tool(_runs([200, 220, 180], [20, 22, 18], 900.0, 540.0), base)
    assert slm["ratio_to_slmedge"]["decode_tokens_per_s"] == 1.0
    assert pt["ratio_to_slmedge"]["ttft_ms"] == 2.0
    assert pt["ratio_to_slmedge"]["decode_tokens_per_s"] == 0.5
    assert pt["ratio_to_slmedge"]["peak_rss_mb"] == 3.0
    assert pt["ttft_ms"]["min"] == 180 and pt["ttft_ms"]["max"] == 220
    slm["agreement_with_pytorch"] = 128
    table = ba.format_table({"slmedge": slm, "pytorch": pt}, new_tokens=128)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["tool", "TTFT", "ms"]
    slm_row = next(ln for ln in lines if ln.startswith("slmedge"))
    pt_row = next(ln for ln in lines if ln.startswith("pytorch"))
    assert "100.0 (90.0-110.0)" in slm_row and "40.0 (36.0-44.0)" in slm_row
    assert slm_row.split()[-1] == "128/128" and pt_row.split()[-1] == "ref"
    assert pt_row.split()[-5:-1] == ["2.00", "0.50", "3.00", "1.00"]


def test_table_without_slmedge_has_no_ratios():
    pt = ba.summarize_tool(_runs([200], [20], 900.0, 540.0), None)
    row = next(
        ln for ln in ba.format_table({"pytorch": pt}, 16).splitlines() if ln.startswith("pytorch")
    )
    assert row.split()[-5:] == ["-", "-", "-", "-", "ref"]


def test_exporter_source_key_changes_with_code(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    k1 = ba.exporter_source_key(tmp_path, {"torch": "2.13.0"})
    assert k1 == ba.exporter_source_key(tmp_path, {"torch": "2.13.0"})
    assert k1 != ba.exporter_source_key(tmp_path, {"torch": "2.14.0"})
    (tmp_path / "a.py").write_text("x = 2\n")
    assert k1 != ba.exporter_source_key(tmp_path, {"torch": "2.13.0"})


def test_model_slug():
    assert ba.model_slug("embedded:smollm2-135m-instruct") == "smollm2-135m-instruct"
    assert ba.model_slug("/models/SmolLM2-135M.Q4_1.gguf") == "smollm2-135m.q4_1"
    assert ba.model_slug("/models/qwen2.5-0.5b/") == "qwen2.5-0.5b"


def test_bad_tools_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        ba.main(["--tools", "slmedge,vllm"])
    assert e.value.code == 2
    assert "unknown tool(s) vllm" in capsys.readouterr().err


def test_failed_step_is_one_line_exit_1(tmp_path, capsys):
    runner = ba.Runner(log_dir=tmp_path, threads=2, say=lambda m: None)
    with pytest.raises(ba.StepFailed) as e:
        runner.run("optimum-venv", ["python3", "-c", "import sys; sys.exit('no wheel for X')"])
    assert str(e.value).startswith("step 'optimum-venv' failed: python3 exited 1: no wheel for X")
    assert "\n" not in str(e.value)


def test_config_fixups_for_transformers_4():
    prep = _load_prepare_hf()
    config = {
        "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
        "dtype": "float32",
    }
    changes = prep.fix_config_for_transformers_4(config)
    assert config["rope_theta"] == 100000.0 and config["torch_dtype"] == "float32"
    assert "rope_scaling" not in config and len(changes) == 2
    assert prep.fix_config_for_transformers_4(config) == []  # idempotent
    scaled = {"rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 32.0}}
    prep.fix_config_for_transformers_4(scaled)
    assert scaled["rope_scaling"] == {"rope_type": "llama3", "factor": 32.0}
    tok = {"tokenizer_class": "TokenizersBackend"}
    assert prep.fix_tokenizer_config_for_transformers_4(tok)
    assert tok["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert json.dumps(tok)  # still plain JSON


def test_child_peak_rss_is_measured_from_outside(tmp_path):
    runner = ba.Runner(log_dir=tmp_path, threads=2, say=lambda m: None)
    code = "import json; b = bytearray(80_000_000); print(json.dumps({'ok': len(b)}))"
    result = runner.run_json("alloc", ["python3", "-c", code])
    assert result["ok"] == 80_000_000
    assert result["_peak_rss_mb_wait4"] > 80
    assert (tmp_path / "alloc.log").read_text().startswith("$ python3 -c")
