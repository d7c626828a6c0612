"""A tiny static-shape artifact exported through ``slmedge export --profile`` (cached per run).

Imported by several test modules; the export happens once per run (all xdist workers).
"""

from __future__ import annotations

from pathlib import Path

from helpers.built_once import built_once

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

        def build(root: Path) -> None:
            root.mkdir()
            profile = root / "test-npu.yaml"
            profile.write_text(TEST_PROFILE)
            code = main(["export", "--model", str(tiny_dir(model_type)), "--output",
                         str(root / "artifact"), "--profile", str(profile), "--json"])
            assert code == 0

        _CACHE[model_type] = built_once(tmp_path_factory, f"static-{model_type}", build) / "artifact"
    return _CACHE[model_type]
