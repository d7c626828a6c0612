"""The CLI contract that tests, benchmarks and users rely on: JSON output, exit codes, errors."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.tiny_models import IM_END
from transformers import AutoModelForCausalLM, AutoTokenizer

from slmedge.runtimes.artifact import sha256_file
from slmedge.runtimes.evaluate import plan_windows, token_nll
from slmedge.tools.cli.app import main

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families, that he is considered the rightful property of some one or other. "
) * 3


def run(capsys, *argv):
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(err: str, *fragments: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got: {err!r}"
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_export_json_is_one_document_with_hashes_and_versions(capsys, tiny_dir, tmp_path):
    out = tmp_path / "art"
    code, stdout, _ = run(capsys, "export", "--model", tiny_dir("qwen2"), "--output", out, "--json")
    assert code == 0
    doc = json.loads(stdout)  # exactly one JSON document, nothing else on stdout
    on_disk = json.loads((out / "manifest.json").read_text())
    assert doc["files"] == on_disk["files"]
    for rel, meta in on_disk["files"].items():
        assert sha256_file(out / rel) == meta["sha256"]
        assert (out / rel).stat().st_size == meta["size"]
    assert {"model.onnx", "tokenizer.json", "generation_config.json", "config.json"} <= set(
        on_disk["files"]
    )
    for package in ("torch", "transformers", "onnx", "onnxruntime"):
        assert on_disk["versions"][package]
    assert on_disk["onnx"]["opset"] == 18 and on_disk["recipe"]["dtype"] == "fp32"
    assert on_disk["source"]["kind"] == "hf-dir" and on_disk["source"]["sha256"]
    assert on_disk["verification"]["parity"]["passed"] is True
    assert "export" in on_disk["command"]
    assert leftovers(tmp_path, "art") == []


def test_dry_run_config_round_trips_through_config(capsys, tiny_dir, tmp_path):
    code, stdout, _ = run(capsys, "export", "--model", tiny_dir("llama"), "--output",
                          tmp_path / "x", "--dtype", "fp16", "--max-context", "64", "--dry-run")
    assert code == 0
    config = json.loads(stdout)
    assert config["dtype"] == "fp16" and config["model"] == str(tiny_dir("llama"))
    assert config["max_context"] == 64
    path = tmp_path / "config.json"
    path.write_text(stdout)
    code, again, _ = run(capsys, "export", "--config", path, "--dry-run")
    assert code == 0 and json.loads(again) == config
    assert not (tmp_path / "x").exists()


def test_generate_json_and_streamed_text_agree(capsys, tiny_artifact):
    art = tiny_artifact("llama")
    code, stdout, _ = run(capsys, "generate", art, "--prompt", "a truth universally",
                          "--max-new-tokens", "12", "--json", "--ignore-eos")
    assert code == 0
    doc = json.loads(stdout)
    assert len(doc["tokens"]) == 12 and doc["stop_reason"] == "length"
    tok = AutoTokenizer.from_pretrained(art)
    assert doc["text"] == tok.decode(doc["tokens"], skip_special_tokens=True)
    assert doc["prompt_ids"] == tok("a truth universally").input_ids
    code, streamed, _ = run(capsys, "generate", art, "--prompt", "a truth universally",
                            "--max-new-tokens", "12", "--ignore-eos")
    assert code == 0 and streamed.rstrip("\n") == doc["text"]


def test_generate_stops_at_a_stop_token_from_the_generation_config(capsys, tiny_artifact, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact("llama"), art)
    code, stdout, _ = run(capsys, "generate", art, "--prompt", "the minds of", "--max-new-tokens",
                          "10", "--json", "--ignore-eos")
    tokens = json.loads(stdout)["tokens"]
    stop = tokens[4]
    first = tokens.index(stop)
    gen = json.loads((art / "generation_config.json").read_text())
    gen["eos_token_id"] = [stop]
    (art / "generation_config.json").write_text(json.dumps(gen))
    # The manifest records file sizes; a changed config must be re-listed to be accepted.
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["files"]["generation_config.json"]["size"] = (art / "generation_config.json").stat().st_size
    (art / "manifest.json").write_text(json.dumps(manifest))
    code, stdout, _ = run(capsys, "generate", art, "--prompt", "the minds of", "--max-new-tokens",
                          "10", "--json")
    doc = json.loads(stdout)
    assert code == 0 and doc["stop_reason"] == "eos" and doc["tokens"] == tokens[:first]


def test_chat_uses_the_template_and_the_end_of_turn_token_stops(capsys, tiny_artifact):
    art = tiny_artifact("llama")
    assert IM_END in json.loads((art / "generation_config.json").read_text())["eos_token_id"]
    code, stdout, _ = run(capsys, "generate", art, "--chat", "--prompt", "hello", "--json",
                          "--max-new-tokens", "3")
    tok = AutoTokenizer.from_pretrained(art)
    rendered = tok.apply_chat_template([{"role": "user", "content": "hello"}],
                                       add_generation_prompt=True, tokenize=False)
    assert rendered.startswith("<|im_start|>user\nhello<|im_end|>")
    expected = tok(rendered, add_special_tokens=False).input_ids
    assert code == 0 and json.loads(stdout)["prompt_ids"] == expected


def test_eval_perplexity_matches_pytorch(capsys, tiny_dir, tiny_artifact, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    code, stdout, _ = run(capsys, "eval", tiny_artifact("phi3"), "--text", text, "--window", "64",
                          "--stride", "32", "--json")
    assert code == 0
    doc = json.loads(stdout)
    tok = AutoTokenizer.from_pretrained(tiny_dir("phi3"))
    model = AutoModelForCausalLM.from_pretrained(tiny_dir("phi3")).eval()
    ids = np.array(tok(TEXT).input_ids)
    total, count = 0.0, 0
    with torch.no_grad():
        for w in plan_windows(len(ids), 64, 32):
            logits = model(input_ids=torch.tensor([ids[w.begin : w.end]])).logits[0].numpy()
            nll = token_nll(logits[w.score_from - 1 - w.begin : w.end - 1 - w.begin],
                            ids[w.score_from : w.end])
            total, count = total + nll.sum(), count + len(nll)
    assert doc["tokens"] == len(ids) and doc["scored"] == count == len(ids) - 1
    assert doc["perplexity"] == pytest.approx(float(np.exp(total / count)), rel=1e-5)


def test_bench_json_has_the_contract_keys(capsys, tiny_artifact):
    art = tiny_artifact("gpt2")
    code, stdout, _ = run(capsys, "bench", art, "--prompt-tokens", "16", "--new-tokens", "8",
                          "--repeats", "2", "--json")
    assert code == 0
    doc = json.loads(stdout)
    for key in ("ttft_ms", "decode_tokens_per_s", "peak_rss_mb", "model_size_mb", "load_s"):
        assert doc[key] > 0, key
    assert doc["model_size_mb"] == pytest.approx((art / "model.onnx").stat().st_size / 1e6, abs=0.01)


def test_external_data_is_written_listed_and_loads(capsys, tiny_dir, tmp_path):
    out = tmp_path / "ext"
    code, _, _ = run(capsys, "export", "--model", tiny_dir("gpt2"), "--output", out,
                     "--external-data")
    assert code == 0
    files = json.loads((out / "manifest.json").read_text())["files"]
    assert files["model.onnx.data"]["role"] == "model" and files["model.onnx"]["role"] == "model"
    assert (out / "model.onnx").stat().st_size < (out / "model.onnx.data").stat().st_size
    code, stdout, _ = run(capsys, "generate", out, "--prompt", "truth", "--max-new-tokens", "3",
                          "--json", "--ignore-eos")
    assert code == 0 and len(json.loads(stdout)["tokens"]) == 3


# -- bad input: one line, an exit code, nothing left behind ------------------------------------


def test_missing_artifact_is_a_usage_error(capsys, tmp_path):
    code, _, err = run(capsys, "generate", tmp_path / "nope", "--prompt", "x")
    assert code == 2
    one_line_error(err, "does not exist", "slmedge export")


def test_missing_model_source_is_a_usage_error(capsys, tmp_path):
    code, _, err = run(capsys, "export", "--model", tmp_path / "nowhere", "--output", tmp_path / "o")
    assert code == 2
    one_line_error(err, "not found")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("model_type", ["mamba", "not_a_real_arch"])
def test_unknown_architecture_exits_4_and_lists_supported(capsys, tiny_dir, tmp_path, model_type):
    src = tmp_path / "src"
    shutil.copytree(tiny_dir("llama"), src)
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = model_type
    (src / "config.json").write_text(json.dumps(config))
    code, _, err = run(capsys, "export", "--model", src, "--output", tmp_path / "o")
    assert code == 4
    one_line_error(err, f"'{model_type}' is not supported", "Llama", "GPT-2", "Gemma 3")
    assert not (tmp_path / "o").exists()


def test_non_empty_output_needs_overwrite(capsys, tiny_dir, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "export", "--model", tiny_dir("llama"), "--output", out)
    assert code == 2
    one_line_error(err, "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"


def test_failed_parity_gate_exits_3_and_writes_nothing(capsys, tiny_dir, tmp_path):
    out = tmp_path / "o"
    code, _, err = run(capsys, "export", "--model", tiny_dir("llama"), "--output", out,
                       "--parity-atol", "1e-12")
    assert code == 3
    one_line_error(err, "parity gate failed", "nothing was written")
    assert not out.exists() and leftovers(tmp_path, "o") == []


def test_failed_export_keeps_the_previous_artifact(capsys, tiny_dir, tiny_artifact, tmp_path):
    out = tmp_path / "o"
    shutil.copytree(tiny_artifact("llama"), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, _, _ = run(capsys, "export", "--model", tiny_dir("llama"), "--output", out,
                     "--overwrite", "--parity-atol", "1e-12")
    assert code == 3
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(tmp_path, "o") == []


def test_truncated_model_file_is_caught_before_loading(capsys, tiny_artifact, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact("llama"), art)
    data = (art / "model.onnx").read_bytes()
    (art / "model.onnx").write_bytes(data[: len(data) // 2])
    code, _, err = run(capsys, "generate", art, "--prompt", "x")
    assert code == 1
    one_line_error(err, "model.onnx", "truncated")


def test_corrupt_model_file_is_a_one_line_error(capsys, tiny_artifact, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact("llama"), art)
    size = (art / "model.onnx").stat().st_size
    (art / "model.onnx").write_bytes(b"\x07garbage" * (size // 8) + b"\x00" * (size % 8))
    code, _, err = run(capsys, "bench", art, "--repeats", "1", "--new-tokens", "2")
    assert code == 1
    one_line_error(err, "could not load", "model.onnx")


def test_console_script_prints_no_traceback(tmp_path):
    exe = Path(sys.executable).with_name("slmedge")
    proc = subprocess.run([str(exe), "eval", str(tmp_path / "missing"), "--text", "x"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    one_line_error(proc.stderr, "does not exist")
    proc = subprocess.run([str(exe), "export", "--bogus-flag"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "unrecognized arguments" in proc.stderr
    help_text = subprocess.run([str(exe), "--help"], capture_output=True, text=True).stdout
    for line in ("0  ok", "1  error", "2  usage", "3  quality gate", "4  unsupported"):
        assert line in help_text


def test_quantize_json_stays_one_document_when_ort_draws_progress(capsys, tiny_artifact, tmp_path):
    """ORT's k_quant (and GPTQ) print a progress bar; it must go to stderr, not into --json."""
    out = tmp_path / "kq"
    code, stdout, err = run(capsys, "quantize", tiny_artifact("llama"), "-o", out, "--quant",
                            "int4", "--algorithm", "k_quant", "--max-ppl-increase", "1000",
                            "--eval-tokens", "256", "--json")
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["quantization"]["weight_precision"]["int4"] > 0
    assert "Progress" in err and "Progress" not in stdout


def test_top_level_help_names_every_command(capsys):
    """`slmedge --help` names each subcommand twice: in the flow of the description and in
    argparse's list with its one-line help (a command added without either fails here)."""
    import argparse

    from slmedge.tools.cli.app import DESCRIPTION, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    commands = {c.dest: c.help for c in sub._choices_actions}
    assert len(commands) == len(sub.choices) >= 11  # every parser has a help line
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    described = set(re.findall(r"[a-z]+", DESCRIPTION))
    for name, text in commands.items():
        assert name in described, f"the description's flow does not name {name}"
        assert f"{name} {' '.join(text.split())}" in help_text, name
