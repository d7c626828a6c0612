"""Shared fixtures: tiny HF checkpoints and their exported artifacts, built once per session."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent))

# Offline and quiet: tests never reach the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The results store (runtimes/bench/results_store.py): the CLI writes every bench / quality card
# there; tests never touch the home directory's store (child processes inherit this).
if not os.environ.get("SLMEDGE_RESULTS"):
    import tempfile

    os.environ["SLMEDGE_RESULTS"] = os.path.join(tempfile.mkdtemp(prefix="slmedge-results-"),
                                                 "results.sqlite")

# Property tests (Hypothesis): CI and tools/test.sh run the "ci" profile, derandomized (the
# same examples every run, so CI cannot pass or fail by chance; every failure found is kept as
# an @example); HYPOTHESIS_PROFILE=explore draws new random examples (local runs, bare pytest).
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True, database=None)
settings.register_profile("explore", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE")
                      or ("ci" if os.environ.get("CI") else "explore"))

REPO = Path(__file__).resolve().parents[1]

from helpers.built_once import built_once  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """``tiny_dir(model_type)`` -> path of a tiny HF checkpoint (cached per session)."""
    from helpers.tiny_models import save_tiny

    cache: dict[str, Path] = {}

    def make(model_type: str) -> Path:
        if model_type not in cache:
            cache[model_type] = built_once(tmp_path_factory, f"hf-{model_type}",
                                           lambda out: save_tiny(model_type, out))
        return cache[model_type]

    return make


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory, tiny_dir):
    """``tiny_artifact(model_type, dtype="fp32", **ExportConfig fields)`` -> exported artifact
    dir (cached per session)."""
    from slmedge.exporter.pipeline import ExportConfig, run_export

    cache: dict[tuple, Path] = {}

    def make(model_type: str, dtype: str = "fp32", **options) -> Path:
        key = (model_type, dtype, tuple(sorted(options.items())))
        if key not in cache:
            digest = hashlib.sha256(repr(key).encode()).hexdigest()[:12]
            source = tiny_dir(model_type)
            cache[key] = built_once(
                # no dtype in the name: reports label a run by it and add "(fp32)" when absent
                tmp_path_factory, f"onnx-{model_type}-{digest}",
                lambda out: run_export(ExportConfig(model=str(source), output=out, dtype=dtype,
                                                    **options)))
        return cache[key]

    return make


@pytest.fixture(scope="session")
def smollm2_artifact(tmp_path_factory):
    """The embedded SmolLM2-135M-Instruct exported to ONNX fp32 (~3 min on 2 cores), once per
    session. Its quality card scores 256 tokens, not the default 4096: no test reads that card
    (the golden tests score 4096 tokens themselves with ``slmedge eval``), and the 4096-token
    card was ~30% of this export (130 of 444 s at load 11). ``SLMEDGE_SMOLLM2_ARTIFACT=DIR``
    reuses an existing export (a local convenience; CI exports from scratch)."""
    reuse = os.environ.get("SLMEDGE_SMOLLM2_ARTIFACT")
    if reuse:
        return Path(reuse)
    from slmedge.exporter.pipeline import ExportConfig, run_export

    def build(out: Path) -> None:
        run_export(ExportConfig(model="embedded:smollm2-135m-instruct", output=out,
                                quality={"eval_tokens": 256}))

    return built_once(tmp_path_factory, "smollm2-fp32", build)


@pytest.fixture(scope="session")
def smollm2_torch():
    """(model, tokenizer) of the embedded SmolLM2 GGUF dequantized in PyTorch fp32."""
    from slmedge.exporter.sources.load import load_source

    loaded = load_source("embedded:smollm2-135m-instruct")
    return loaded.model, loaded.tokenizer
