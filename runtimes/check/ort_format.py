"""The header facts of an ``.ort`` file (ONNX Runtime's ORT format), read without a session.

An ``.ort`` file is a FlatBuffers buffer (schema ``onnxruntime/core/flatbuffers/schema/ort.fbs``
in microsoft/onnxruntime): a little-endian ``uint32`` offset to the root table, then the file
identifier ``ORTM`` at bytes 4..8. The root table ``InferenceSession`` has ``ort_version``
(field 0, a string) and ``model`` (field 1, a ``Model`` table: ``ir_version`` int64 field 0,
``opset_import`` [OperatorSetId] field 1, ``producer_name`` / ``producer_version`` strings,
fields 2 and 3; ``OperatorSetId``: ``domain`` string field 0, ``version`` int64 field 1).

``ort_version`` is the ORT *format* version (``kOrtModelVersion`` of
``onnxruntime/core/flatbuffers/ort_format_version.h``: "This version is NOT onnxruntime
version"), not the release that wrote the file. The file records no producing release at all:
``producer_name`` / ``producer_version`` are the source ONNX model's (e.g. ``pytorch``), so a
bundle records the onnxruntime that converted its graphs from the artifact's manifest instead.

The header is read with the FlatBuffers bindings onnxruntime ships (generated from ``ort.fbs``;
``flatbuffers`` is one of onnxruntime's own dependencies); what a damaged buffer raises there is
an :class:`OrtFormatError` naming the file.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from slmedge.runtimes.errors import ArtifactError

FILE_IDENTIFIER = b"ORTM"

# -- which ONNX Runtime release reads which ORT format version ------------------------------
#
# ORT format version -> (first release that reads it, first release whose minimal build no
# longer reads it, or None). Sources:
# - the "Backwards Compatibility" table of
#   https://onnxruntime.ai/docs/performance/model-optimizations/ort-format-models.html:
#   1.5 reads v1; 1.6 v1-v2; 1.7 v1-v3; 1.8-1.12 v4 only (v4 changed the kernel def hashes, NOT
#   backwards compatible); 1.13 v5 only (kernel def hashes removed); 1.14+ v5, and v4 with
#   limited support;
# - v6 (float 8 types; microsoft/onnxruntime onnxruntime/core/flatbuffers/schema/README.md at
#   commit a80912204add4e15b34542eb412348f53edb8098) came with 1.16.0: "We don't generally
#   support forwards compatibility. v6 was introduced in ORT 1.16.0 so the minimum version you
#   would be able to use a v6 model in is 1.16.0" (microsoft/onnxruntime#20670);
# - the load rule in onnxruntime/core/session/inference_session.cc: a minimal build reads only
#   the versions IsOrtModelVersionSupported() lists ("This build doesn't support ORT format
#   models older than version 5"); a full build also reads a version < 5 by re-deriving the
#   kernel constraints. A minimal build is what runs a bundle shipped as .ort, so the v4 row
#   ends at 1.13.
# Checked on onnxruntime 1.32.0 (full build): it writes v6 and, with only the version string
# of the file changed, loads v3, v4, v5 and v6 and refuses v7 ("The ORT format model version
# [7] is not supported in this build 1.32.0").
ORT_FORMAT_VERSIONS: dict[int, tuple[tuple[int, int], tuple[int, int] | None]] = {
    1: ((1, 5), (1, 8)),
    2: ((1, 6), (1, 8)),
    3: ((1, 7), (1, 8)),
    4: ((1, 8), (1, 13)),
    5: ((1, 13), None),
    6: ((1, 16), None),
}
#: Format version -> the first ONNX Runtime release that reads it.
ORT_FORMAT_MINIMUM: dict[int, tuple[int, int]] = {
    v: first for v, (first, _) in ORT_FORMAT_VERSIONS.items()}
#: From this release a full (not minimal) build also reads versions older than 5, with limited
#: support (the docs' table: "1.14+ | v5, v4 (limited support)"; the load rule: "models prior to
#: v5 can be handled by inserting the kernel constraints in a full build").
FULL_BUILD_READS_OLD_FROM = (1, 14)
#: The newest release whose ORT format support the table above was checked against: no release
#: up to it reads a version newer than the table's newest.
ORT_FORMAT_CHECKED_THROUGH = (1, 32)


class OrtFormatError(ArtifactError):
    """A file that is not a valid ORT format (FlatBuffers) model: exit 1, naming the file."""


def _version_text(version: tuple[int, int]) -> str:
    return f"{version[0]}.{version[1]}"


# -- the header, through ONNX Runtime's own FlatBuffers bindings ---------------------------

#: What a damaged FlatBuffers buffer raises in the generated Python bindings (they read with
#: struct / slicing and do not bounds-check).
_DAMAGED = (struct.error, IndexError, ValueError, TypeError, UnicodeDecodeError, OverflowError)


def parse_ort_header(data, name: str = "ORT model") -> dict:
    """The header facts of the ORT format bytes ``data`` (bytes, or a memory map):
    ``format_version`` (int, ``InferenceSession.ort_version``), ``ir_version``, ``opset`` (the
    ai.onnx opset), ``opset_imports`` ({domain: version}), ``producer`` (the source model's
    ``producer_name producer_version``). Read with the bindings onnxruntime ships
    (``onnxruntime.tools.ort_format_model``, generated from ``ort.fbs``); raises
    :class:`OrtFormatError` naming ``name``."""
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs import InferenceSession

    def fail(what: str):
        raise OrtFormatError(f"{name}: not a valid ORT format file ({what}); convert the "
                             "model again or copy the bundle again") from None

    size = len(data)
    if size < 8:
        fail(f"{size} bytes, shorter than a FlatBuffers header")
    if bytes(data[4:8]) != FILE_IDENTIFIER:
        fail(f"file identifier {bytes(data[4:8])!r} at bytes 4..8, not {FILE_IDENTIFIER!r}")

    def text(raw) -> str | None:
        return raw.decode("utf-8", "replace") if raw is not None else None

    try:
        session = InferenceSession.InferenceSession.GetRootAs(data, 0)
        version_text = text(session.OrtVersion())
        if version_text is None:
            fail("no ORT format version (InferenceSession.ort_version)")
        try:
            version = int(version_text)
        except ValueError:
            fail(f"ORT format version {version_text!r} is not a number")
        model = session.Model()
        if model is None:
            fail("no model (InferenceSession.model)")
        opsets = {}
        for i in range(model.OpsetImportLength()):
            entry = model.OpsetImport(i)
            opsets[text(entry.Domain()) or "ai.onnx"] = entry.Version()
        producer = " ".join(p for p in (text(model.ProducerName()),
                                        text(model.ProducerVersion())) if p)
        ir_version = model.IrVersion()
    except _DAMAGED as e:
        fail(f"a header field points past the end of the {size}-byte file or is garbled: {e}")
    return {"format_version": version, "ir_version": ir_version,
            "opset": opsets.get("ai.onnx"), "opset_imports": dict(sorted(opsets.items())),
            "producer": producer or None}


def read_ort_header(path: str | Path, name: str | None = None) -> dict:
    """:func:`parse_ort_header` of the file at ``path`` (memory-mapped: only the few header
    pages are read, however large the weights). ``name``: how errors name the file."""
    path = Path(path)
    name = name or str(path)
    try:
        with open(path, "rb") as f:
            if path.stat().st_size < 8:
                return parse_ort_header(f.read(), name)
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return parse_ort_header(data, name)
    except OSError as e:
        raise OrtFormatError(f"{name}: cannot be read ({e.strerror or e})") from None


def ort_file_facts(path: str | Path, name: str, converted_with: str | None) -> dict:
    """The header facts of one ``.ort`` file with the first ONNX Runtime release that reads
    its format (``minimum_onnxruntime``, None if unknown) and the onnxruntime that converted it
    (``converted_with``: the file does not record it; manifests do)."""
    header = read_ort_header(path, name)
    first, _ = format_requirement(name, header["format_version"])
    return {**header, "minimum_onnxruntime": _version_text(first) if first else None,
            "converted_with": converted_with}


# -- what a format version needs -------------------------------------------------------------


def format_requirement(name: str, version: int) -> tuple[tuple[int, int] | None, str]:
    """``(first ONNX Runtime release that reads it or None if unknown, why)`` for an ``.ort``
    file ``name`` in ORT format ``version``."""
    first = ORT_FORMAT_MINIMUM.get(version)
    if first is not None:
        return first, f"{name}: ORT format v{version}, read from ONNX Runtime " \
                      f"{_version_text(first)} on"
    newest = max(ORT_FORMAT_VERSIONS)
    if version > newest:
        return None, (f"{name}: ORT format v{version}, newer than any ONNX Runtime up to "
                      f"{_version_text(ORT_FORMAT_CHECKED_THROUGH)} reads (v{newest})")
    return None, f"{name}: ORT format v{version}, not in slmedge's table of ORT format versions"


def format_problem(name: str, version: int, runtime: tuple[int, int],
                   converted_with: str | None = None) -> str | None:
    """Why ONNX Runtime ``runtime`` cannot load ``.ort`` file ``name`` in ORT format
    ``version`` (None: it can, or slmedge cannot tell)."""
    made = f", converted by onnxruntime {converted_with}" if converted_with else ""
    row = ORT_FORMAT_VERSIONS.get(version)
    newest = max(ORT_FORMAT_VERSIONS)
    if row is None:
        if version > newest and runtime <= ORT_FORMAT_CHECKED_THROUGH:
            return (f"{name}: ORT format v{version}{made} (no ONNX Runtime release up to "
                    f"{_version_text(ORT_FORMAT_CHECKED_THROUGH)} reads it; v{newest} is the "
                    "newest they read)")
        return None
    first, last = row
    if runtime < first:
        return (f"{name}: ORT format v{version}{made} (read from ONNX Runtime "
                f"{_version_text(first)} on; older releases do not read newer ORT format "
                "versions)")
    if last is not None and runtime >= last:
        return (f"{name}: ORT format v{version}{made} (not read from ONNX Runtime "
                f"{_version_text(last)} on, but for limited support in full builds from "
                f"{_version_text(FULL_BUILD_READS_OLD_FROM)}; a minimal build does not read it)")
    return None


def raise_minimum(minimum: dict, requirements: list[tuple[tuple[int, int] | None, str]]) -> dict:
    """``minimum`` (:func:`slmedge.runtimes.check.verify.minimum_onnxruntime`'s dict) raised by the
    ``.ort`` files' format requirements (:func:`format_requirement`)."""
    minimum = {**minimum, "because": list(minimum["because"]),
               "unknown": list(minimum["unknown"])}
    for first, why in requirements:
        have = tuple(int(x) for x in minimum["version"].split("."))
        if first is None:
            minimum["unknown"].append(why)
        elif first > have:
            minimum["version"], minimum["because"] = _version_text(first), [why]
        elif first == have:
            minimum["because"].append(why)
    return minimum
