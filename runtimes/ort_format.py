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

The reader below is a few vtable lookups with every offset bounds-checked, so a truncated or
altered file is an :class:`OrtFormatError` naming it, never a wrong value or a crash; it needs
neither onnxruntime nor the ``flatbuffers`` package.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from .errors import ArtifactError

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


# -- the FlatBuffers reader ----------------------------------------------------------------


class _Buffer:
    """Bounds-checked little-endian reads of a FlatBuffers buffer."""

    def __init__(self, data, name: str):
        self.data, self.name, self.size = data, name, len(data)

    def fail(self, what: str):
        raise OrtFormatError(f"{self.name}: not a valid ORT format file ({what}); convert the "
                             "model again or copy the bundle again")

    def _unpack(self, fmt: str, pos: int, what: str):
        width = struct.calcsize(fmt)
        if pos < 0 or pos + width > self.size:
            self.fail(f"{what} at byte {pos} is past the end of the {self.size}-byte file")
        return struct.unpack_from(fmt, self.data, pos)[0]

    def field(self, table: int, index: int, what: str) -> int | None:
        """Absolute position of field ``index`` of the table at ``table`` (None: absent)."""
        vtable = table - self._unpack("<i", table, f"{what} table")
        vsize = self._unpack("<H", vtable, f"{what} vtable")
        if vsize < 4 or vsize % 2:
            self.fail(f"{what} vtable of {vsize} bytes")
        slot = 4 + 2 * index
        if slot + 2 > vsize:
            return None
        offset = self._unpack("<H", vtable + slot, f"{what} field {index}")
        return table + offset if offset else None

    def follow(self, pos: int, what: str) -> int:
        """The position an offset (``uoffset_t``) at ``pos`` points to."""
        target = pos + self._unpack("<I", pos, what)
        if target >= self.size:
            self.fail(f"{what} points past the end of the file")
        return target

    def string(self, table: int, index: int, what: str) -> str | None:
        pos = self.field(table, index, what)
        if pos is None:
            return None
        start = self.follow(pos, what)
        length = self._unpack("<I", start, f"{what} length")
        if start + 4 + length >= self.size:  # the string, then its 0 terminator
            self.fail(f"{what} of {length} bytes runs past the end of the file")
        if self.data[start + 4 + length] != 0:
            self.fail(f"{what} has no 0 terminator")
        return bytes(self.data[start + 4:start + 4 + length]).decode("utf-8", "replace")

    def int64(self, table: int, index: int, what: str) -> int | None:
        pos = self.field(table, index, what)
        return None if pos is None else self._unpack("<q", pos, what)

    def table(self, table: int, index: int, what: str) -> int | None:
        pos = self.field(table, index, what)
        return None if pos is None else self.follow(pos, what)

    def tables(self, table: int, index: int, what: str) -> list[int]:
        pos = self.field(table, index, what)
        if pos is None:
            return []
        start = self.follow(pos, what)
        count = self._unpack("<I", start, f"{what} length")
        if start + 4 + 4 * count > self.size:
            self.fail(f"{what} of {count} entries runs past the end of the file")
        return [self.follow(start + 4 + 4 * i, f"{what}[{i}]") for i in range(count)]


def parse_ort_header(data, name: str = "ORT model") -> dict:
    """The header facts of the ORT format bytes ``data`` (bytes, or a memory map):
    ``format_version`` (int, ``InferenceSession.ort_version``), ``ir_version``, ``opset`` (the
    ai.onnx opset), ``opset_imports`` ({domain: version}), ``producer`` (the source model's
    ``producer_name producer_version``). Raises :class:`OrtFormatError` naming ``name``."""
    buf = _Buffer(data, name)
    if buf.size < 8:
        buf.fail(f"{buf.size} bytes, shorter than a FlatBuffers header")
    if bytes(data[4:8]) != FILE_IDENTIFIER:
        buf.fail(f"file identifier {bytes(data[4:8])!r} at bytes 4..8, not {FILE_IDENTIFIER!r}")
    root = buf.follow(0, "root table offset")
    text = buf.string(root, 0, "InferenceSession.ort_version")
    if text is None:
        buf.fail("no ORT format version (InferenceSession.ort_version)")
    try:
        version = int(text)
    except ValueError:
        buf.fail(f"ORT format version {text!r} is not a number")
    model = buf.table(root, 1, "InferenceSession.model")
    if model is None:
        buf.fail("no model (InferenceSession.model)")
    opsets = {}
    for entry in buf.tables(model, 1, "Model.opset_import"):
        domain = buf.string(entry, 0, "OperatorSetId.domain") or "ai.onnx"
        opsets[domain] = buf.int64(entry, 1, "OperatorSetId.version") or 0
    producer = " ".join(p for p in (buf.string(model, 2, "Model.producer_name"),
                                    buf.string(model, 3, "Model.producer_version")) if p)
    return {"format_version": version, "ir_version": buf.int64(model, 0, "Model.ir_version"),
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
    """``minimum`` (:func:`slmedge.runtimes.verify.minimum_onnxruntime`'s dict) raised by the
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
