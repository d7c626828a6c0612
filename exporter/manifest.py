"""Build ``manifest.json``: provenance, recipe, versions, graph facts and file hashes.

Every manifest is validated against the typed schema (``runtimes/manifest_schema.py``)
before it is written: :func:`write_manifest` for a new artifact, :func:`save_manifest` for
one a later step amends (profile exports, bundles).
"""

from __future__ import annotations

import json
import platform
import sys
from collections import Counter
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from slmedge.runtimes.artifact import (
    BUNDLE_SCHEMA_VERSION,
    MANIFEST_NAME,
    MANIFEST_SCHEMA_VERSION,
    check_schema_version,
    sha256_file,
)
from slmedge.runtimes.errors import SlmEdgeError, validation_problems

_VERSIONED = ("slmedge", "torch", "transformers", "onnx", "onnxscript", "onnx-ir",
              "onnxruntime", "tokenizers", "gguf")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def onnx_facts(model_path: Path) -> dict:
    """Opset, IR version and op counts of a graph (weights not loaded)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    opsets = {imp.domain or "ai.onnx": imp.version for imp in model.opset_import}
    ops = Counter(
        (f"{n.domain}." if n.domain and n.domain != "ai.onnx" else "") + n.op_type
        for n in model.graph.node
    )
    return {
        "opset": opsets.get("ai.onnx"),
        "opset_imports": opsets,
        "ir_version": model.ir_version,
        "nodes": sum(ops.values()),
        "ops": dict(sorted(ops.items())),
        "contrib_ops": sorted(op for op in ops if op.startswith("com.microsoft.")),
    }


def graph_signature(model_path: Path) -> dict:
    """Inputs (initializers excluded) and outputs of a graph: name, dtype, shape (a symbolic
    dimension by its name), as the static-shape snippets show them."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}

    def tensor(value) -> dict:
        t = value.type.tensor_type
        dtype = onnx.TensorProto.DataType.Name(t.elem_type).lower()
        return {"name": value.name, "dtype": "float32" if dtype == "float" else dtype,
                "shape": [d.dim_value if d.HasField("dim_value") else d.dim_param
                          for d in t.shape.dim]}

    return {"inputs": [tensor(i) for i in graph.input if i.name not in initializers],
            "outputs": [tensor(o) for o in graph.output]}


def graph_io(model_path: Path) -> dict:
    """Input and output names of the final graph (fusion adds ``logits_to_keep``): the
    manifest's ``io``, :func:`graph_signature` without dtypes and shapes."""
    return {side: [t["name"] for t in tensors]
            for side, tensors in graph_signature(model_path).items()}


def file_table(root: Path, model_files: set[str]) -> dict[str, dict]:
    """sha256 and size of every file under ``root`` except the manifest itself."""
    table = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST_NAME:
            rel = str(p.relative_to(root))
            table[rel] = {
                "sha256": sha256_file(p),
                "size": p.stat().st_size,
                "role": "model" if rel in model_files else "support",
            }
    return table


def build_manifest(root: Path, fields: dict, model_files: set[str]) -> dict:
    """The manifest of the files in ``root``: the given fields plus hashes and versions (not
    written: :func:`save_manifest`)."""
    return {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        **fields,
        "versions": package_versions(),
        "files": file_table(root, model_files),
    }


def write_manifest(root: Path, fields: dict, model_files: set[str]) -> dict:
    """Write ``manifest.json`` into ``root`` with the given fields plus hashes and versions."""
    return save_manifest(root, build_manifest(root, fields, model_files))


def save_manifest(root: Path, manifest: dict, indent: int | None = 2) -> dict:
    """Validate ``manifest`` against the typed schema, then write it into ``root``; returns
    it. A manifest the schema refuses is slmedge's own bug: SlmEdgeError (exit 1) naming
    the fields, and the file is not written."""
    from pydantic import ValidationError

    from slmedge.runtimes.manifest_schema import BundleManifest, Manifest

    bundle = manifest.get("kind") == "bundle"
    check_schema_version(manifest, root / MANIFEST_NAME, root)
    try:
        (BundleManifest if bundle else Manifest).model_validate(manifest)
    except ValidationError as e:
        problems = validation_problems(e, limit=5)
        raise SlmEdgeError(
            f"slmedge built a {'bundle ' if bundle else ''}manifest for {root} that its own "
            f"schema (version {BUNDLE_SCHEMA_VERSION if bundle else MANIFEST_SCHEMA_VERSION}) "
            f"refuses: {problems}; it was not written. This is a bug in slmedge: please "
            "report it with the command") from None
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=indent)
                                      + ("\n" if indent else ""))
    return manifest
