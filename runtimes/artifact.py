"""An exported artifact directory and its manifest, read without torch.

An artifact directory holds the model file(s), the tokenizer files, the generation
config and ``manifest.json``. The manifest lists every file with its size and
sha256; :func:`open_artifact` checks the manifest's schema version and the sizes (cheap,
catches truncation) and :meth:`Artifact.verify_hashes` checks contents.

Two views of the manifest: ``Artifact.info`` is the typed, validated model
(``runtimes/manifest_schema.py``, pydantic) that readers on the host use;
``Artifact.manifest`` is the raw JSON dict, for the benchmark runner and the decoders it
opens on a Pi or a phone, where only onnxruntime, numpy and psutil are installed (no
pydantic). Both refuse a manifest of another major schema version (exit 2) through
:func:`check_schema_version`, which needs nothing but the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ArtifactError, UsageError
from .manifest_version import (  # noqa: F401  (re-exported: the names readers import from here)
    BUNDLE_SCHEMA_VERSION,
    MANIFEST_NAME,
    MANIFEST_SCHEMA_VERSION,
    check_schema_version,
    read_manifest_json,
    reexport_command,
    schema_major,
)

if TYPE_CHECKING:
    from .manifest_schema import BundleManifest, Manifest

def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Return the hex sha256 of a file, read in 1 MiB chunks."""
    import hashlib  # OpenSSL's libcrypto: ~3.6 MB resident, only when a file is hashed

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Artifact:
    """An artifact directory: where it is, its manifest, and its main model file."""

    root: Path
    manifest: dict
    model_path: Path
    files: dict[str, dict] = field(default_factory=dict)

    @cached_property
    def info(self) -> Manifest | BundleManifest | None:
        """The typed manifest, validated on first use (UsageError, exit 2, naming the file and
        the fields at fault); None for a bare model file. Needs pydantic: the benchmark runner
        on a target reads :attr:`manifest` instead."""
        if not self.manifest:
            return None
        from .manifest_schema import validate_manifest

        return validate_manifest(self.manifest, self.root / MANIFEST_NAME, self.root)

    @property
    def format(self) -> str:
        return self.manifest.get("format", "onnx")

    def file_size_mb(self) -> float:
        """Size on disk of the model files a session loads (graph + external data), in MB
        (10^6 bytes). A profile export's ``.ort`` files (``ort_format.files``) hold the same
        weights as its ``.onnx`` graphs and a device loads one or the other: they count only
        when there is no ``.onnx`` graph (a bundle shipped in ORT format)."""
        model = [rel for rel, meta in self.files.items() if meta.get("role") == "model"]
        ort = set((self.manifest.get("ort_format") or {}).get("files") or [])
        model = [rel for rel in model if rel not in ort] or model
        total = sum((self.root / rel).stat().st_size for rel in model)
        if total == 0:
            total = self.model_path.stat().st_size
        return total / 1e6

    def verify_hashes(self) -> list[str]:
        """Re-hash every file the manifest lists; return the problems found (empty: all good)."""
        problems = []
        for rel, meta in self.files.items():
            p = self.root / rel
            if not p.exists():
                problems.append(f"{rel}: missing")
                continue
            if p.stat().st_size != meta.get("size"):
                problems.append(f"{rel}: size {p.stat().st_size} bytes, manifest says {meta.get('size')}")
                continue
            if sha256_file(p) != meta.get("sha256"):
                problems.append(f"{rel}: sha256 differs from the manifest (file altered or corrupt)")
        return problems


def open_artifact(path: str | Path) -> Artifact:
    """Open an artifact directory (or a bare ``.onnx`` file) and check it is complete.

    Raises :class:`UsageError` for a path that does not exist and :class:`ArtifactError`
    for a directory that is not a complete slmedge artifact.
    """
    root = Path(path)
    if not root.exists():
        raise UsageError(
            f"artifact '{path}' does not exist; export one first: "
            f"slmedge export --model SRC --output {path}"
        )
    if root.is_file():
        # A bare model file: allowed for generate/bench, with the tokenizer beside it.
        return Artifact(root=root.parent, manifest={}, model_path=root)
    mpath = root / MANIFEST_NAME
    if not mpath.exists():
        found = sorted(p.name for p in root.iterdir())[:10]
        raise ArtifactError(
            f"'{root}' has no {MANIFEST_NAME}, so it is not an slmedge artifact "
            f"(it holds: {', '.join(found) or 'nothing'}); export into it with slmedge export"
        )
    manifest = read_manifest_json(mpath)
    files = manifest.get("files", {})
    model_rel = manifest.get("model_file", "model.onnx")
    model_path = root / model_rel
    if not model_path.exists():
        raise ArtifactError(f"{root}: the manifest names model file '{model_rel}', which is missing")
    for rel, meta in files.items():
        p = root / rel
        if not p.exists():
            raise ArtifactError(f"{root}: file '{rel}' listed in the manifest is missing")
        size = p.stat().st_size
        if "size" in meta and size != meta["size"]:
            raise ArtifactError(
                f"{p}: {size} bytes on disk but {meta['size']} in the manifest: the file is "
                "truncated or altered; copy or export it again"
            )
    return Artifact(root=root, manifest=manifest, model_path=model_path, files=files)
