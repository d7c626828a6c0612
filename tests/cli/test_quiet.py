"""Quiet by default: dependency warnings a user can do nothing about stay off the terminal;
``slmedge -v`` shows them (issue 14)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from slmedge.exporter.quiet import quiet_libraries

NOISE = ("not writable", "torchvision", "de-quantizing", "UserWarning", "FutureWarning")


def slmedge(*argv, verbose_env: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SLMEDGE_VERBOSE"}
    return subprocess.run([sys.executable, "-m", "slmedge.tools.cli", *map(str, argv)],
                          capture_output=True, text=True, timeout=900, env=env)


def noise_in(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if any(n in line for n in NOISE)]


def test_int4_export_prints_no_dependency_warnings(tiny_dir, tmp_path):
    proc = slmedge("export", "--model", tiny_dir("llama"), "--output", tmp_path / "q4",
                   "--quant", "int4")
    assert proc.returncode == 0, proc.stderr
    assert noise_in(proc.stderr) == [], proc.stderr


@pytest.mark.parametrize("where", ["before", "after"])
def test_quantize_is_quiet_and_verbose_shows_the_warnings(tiny_artifact, tmp_path, where):
    art = tiny_artifact("llama")
    # Block 64 = the tiny model's hidden size: a weight that is one block along K goes through
    # ONNX Runtime's own HQQ code (exporter/quantize/hqq.py does the rest), whose
    # torch.from_numpy on a read-only array makes PyTorch warn: a dependency warning to hide.
    quiet = slmedge("quantize", art, "--quant", "int4", "--block-size", "64",
                    "-o", tmp_path / "quiet")
    assert quiet.returncode == 0, quiet.stderr
    assert noise_in(quiet.stderr) == [], quiet.stderr
    flag = ["-v", "quantize"] if where == "before" else ["quantize", "--verbose"]
    loud = slmedge(*flag, art, "--quant", "int4", "--block-size", "64", "-o", tmp_path / "loud")
    assert loud.returncode == 0, loud.stderr
    # PyTorch's warning, printed through ORT's int4 quantizer (onnxruntime 1.32, torch 2.13)
    assert any("not writable" in line for line in loud.stderr.splitlines()), loud.stderr


def test_the_gguf_dequantization_bar_is_hidden(capfd, monkeypatch):
    """transformers draws it with its module's own tqdm, which disable_progress_bar() misses."""
    gguf_utils = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    monkeypatch.delenv("SLMEDGE_VERBOSE", raising=False)
    with quiet_libraries():
        list(gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."))
    assert "de-quantizing" not in capfd.readouterr().err
    list(gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."))
    assert "de-quantizing" in capfd.readouterr().err  # outside the block: as before
    monkeypatch.setenv("SLMEDGE_VERBOSE", "1")
    with quiet_libraries():
        list(gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."))
    assert "de-quantizing" in capfd.readouterr().err
