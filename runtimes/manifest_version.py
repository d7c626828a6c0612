"""The manifest's name and schema versions, and the version check, with the standard
library only: the benchmark runner on a Pi or a phone (no pydantic) refuses a manifest of
another major version with the same message as the typed reader
(``runtimes/manifest_schema.py``, which states the versioning rules).
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ArtifactError, UsageError

MANIFEST_NAME = "manifest.json"
#: Major version of an artifact's manifest (runtimes/manifest_schema.py: versioning rules).
MANIFEST_SCHEMA_VERSION = 1
#: Major version of a bundle's manifest (``kind: bundle``).
BUNDLE_SCHEMA_VERSION = 1


def schema_major(version) -> int | None:
    """The major part of a ``schema_version``: ``1`` -> 1, ``"1.3"`` -> 1; None if it is
    neither an integer nor ``"MAJOR[.MINOR]"``."""
    if isinstance(version, bool):
        return None
    if isinstance(version, int):
        return version
    if isinstance(version, str):
        head = version.split(".")[0]
        if head.isdigit() and all(part.isdigit() for part in version.split(".")):
            return int(head)
    return None


def reexport_command(doc: dict, root: Path) -> str:
    """The command that writes this artifact (or bundle) again with this slmedge, from what
    its manifest says about its source."""
    def section(key):
        value = doc.get(key)
        return value if isinstance(value, dict) else {}

    src, profile = section("source"), section("profile")
    if doc.get("kind") == "bundle":
        return (f"slmedge bundle {src.get('path', 'ARTIFACT')} --profile "
                f"{profile.get('name', 'PROFILE')} -o {root}")
    derived = section("derived_from")
    if derived:
        applied = section("quantization").get("recipe")
        scheme = (applied.get("scheme") if isinstance(applied, dict) else None) or "SCHEME"
        return f"slmedge quantize {derived.get('artifact', 'FP32_ARTIFACT')} -o {root} --quant {scheme}"
    cmd = f"slmedge export --model {src.get('location', 'SRC')} --output {root}"
    if profile.get("name"):
        cmd += f" --profile {profile['name']}"
    if doc.get("format") == "tflite":
        cmd += " --format tflite"
    return cmd


def check_schema_version(doc, source, root: Path | None = None) -> int:
    """Refuse a manifest this slmedge cannot read: not a JSON object, no ``schema_version``,
    or another major version. Raises :class:`UsageError` (exit 2) naming the version found,
    the version read here and the command that writes the artifact again; returns the
    major version."""
    root = Path(root) if root is not None else Path(str(source)).parent
    if not isinstance(doc, dict):
        raise UsageError(f"{source} holds a JSON {type(doc).__name__}, not a manifest object; "
                         f"export the artifact again")
    bundle = doc.get("kind") == "bundle"
    supported = BUNDLE_SCHEMA_VERSION if bundle else MANIFEST_SCHEMA_VERSION
    what = "bundle manifest" if bundle else "manifest"
    found = doc.get("schema_version")
    major = schema_major(found)
    if major == supported:
        return major
    seen = ("no schema_version" if "schema_version" not in doc
            else f"schema version {found!r}")
    raise UsageError(
        f"{source} has {seen}; this slmedge reads {what} schema version {supported} "
        f"(and {supported}.x); write it again with this version: {reexport_command(doc, root)}")


def read_manifest_json(path: Path) -> dict:
    """The JSON of a ``manifest.json`` (ArtifactError if it is not JSON), version-checked."""
    try:
        doc = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); re-export the artifact") from None
    check_schema_version(doc, path, Path(path).parent)
    return doc


