"""A tiny static-shape artifact exported through ``slmedge export --profile`` (cached per run).

Imported by several test modules; the module-level cache makes the export happen once.
"""

from __future__ import annotations

from pathlib import Path

# A small window keeps the tiny export quick; it still spans two prefill chunks.
TEST_PROFILE = """\
name: test-npu
extends: android-nnapi
shapes:
  context_length: 32
  prefill_chunk: 8
"""
_CACHE: dict[str, Path] = {}


def static_artifact_path(tmp_path_factory, tiny_dir, model_type: str = "llama") -> Path:
    """Export ``model_type`` with a profile extending android-nnapi (static 32 / 8, .ort)."""
    if model_type not in _CACHE:
        from slmedge.tools.cli.app import main

        root = tmp_path_factory.mktemp(f"static-{model_type}")
        profile = root / "test-npu.yaml"
        profile.write_text(TEST_PROFILE)
        out = root / "artifact"
        code = main(["export", "--model", str(tiny_dir(model_type)), "--output", str(out),
                     "--profile", str(profile), "--json"])
        assert code == 0
        _CACHE[model_type] = out
    return _CACHE[model_type]
