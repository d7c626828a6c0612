"""One copy of a static export's weights for its prefill and decode sessions (no torch, no onnx).

A static-shape export has two graphs, ``prefill.onnx`` and ``decode.onnx``, whose weights live
once on disk in a shared external-data file (``model.onnx.data``). ONNX Runtime opens each
graph on its own, so a process running both holds the weights per session:

- weights ORT uses as stored are memory-mapped from the file by each session: one physical
  copy in the page cache, but two mappings, so the process's RSS counts them twice;
- weights ORT rebuilds at load are private to each session: MatMul pre-packing (a per-session
  copy in the kernel's layout; the ``PrepackedWeightsContainer`` that would share it is not in
  the Python API), fp16 weights cast to fp32 by constant folding where the CPU provider has no
  fp16 kernel (x86), 8-bit QDQ weights rewritten into ``MatMulNBits``.

:class:`SharedWeights` maps the file once (read-only ``np.memmap``), wraps every external
tensor as an ``OrtValue`` over that mapping and registers it in each session's options with
``SessionOptions.add_initializer``: both sessions then compute from the same pages. It also
turns pre-packing off — a pre-packed kernel would keep its own copy *and* the shared original
alive, more memory than not sharing — and puts both sessions on one CPU arena
(``session.use_env_allocators``; that arena is process-wide and keeps its memory after the
sessions are gone). Measured on SmolLM2-135M, x86 CPU, 2 threads (``tools/bench/static_rss.py``):
the fp32 static export (android-nnapi) holds 759 MB instead of 1212 MB after a 128-token
prompt and 16 decode steps, loads in 0.65 s instead of 1.7 s, and runs prefill chunks ~30%
and decode steps ~15% slower (unpacked GEMM weights). The fp16 (ios-coreml) and a16w8
(android-qnn-htp) exports barely gain on this CPU: ORT rebuilds their weights per session
whatever is shared (fp32 casts; ``MatMulNBits``), and a16w8 decode gets 2.6x slower.
Hence off by default (``StaticDecoder(share_weights=True)``).

Only for sessions on the CPU provider: providers that compile the graph (QNN, CoreML, NNAPI)
copy the weights into their own compiled model, where user-owned initializers buy nothing and
were not verified.

The ONNX files are read with a small protobuf reader (``external_tensors``): ``onnx`` is an
export-only dependency, and only the top-level graph's initializers are needed.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

# TensorProto.DataType -> numpy; other types (bfloat16, float8, int4, strings) stay with ORT.
_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32,
           7: np.int64, 9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64}
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


@dataclass(frozen=True)
class ExternalTensor:
    """An initializer whose bytes are in an external-data file."""

    name: str
    data_type: int  # ONNX TensorProto.DataType
    shape: tuple[int, ...]
    location: str  # file name, relative to the model's directory
    offset: int
    length: int | None  # None when the entry does not say

    @property
    def dtype(self) -> np.dtype | None:
        t = _DTYPES.get(self.data_type)
        return np.dtype(t) if t is not None else None


# -- a minimal protobuf wire-format reader ------------------------------------------------


def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _fields(buf, start: int, end: int):
    """(field number, wire type, value) of a message in ``buf[start:end]``; the value of a
    length-delimited field is its (start, end) span, of a varint its integer."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield field, wire, value
        elif wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > end:
                raise ValueError(f"field {field} runs past its message")
            yield field, wire, (pos, pos + n)
            pos += n
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire} (field {field})")
    if pos != end:
        raise ValueError("message truncated")


def _text(buf, span: tuple[int, int]) -> str:
    return bytes(buf[span[0]:span[1]]).decode("utf-8")


def _tensor(buf, start: int, end: int) -> ExternalTensor | None:
    dims: list[int] = []
    data_type = location_kind = 0
    name = ""
    entries: dict[str, str] = {}
    for field, wire, value in _fields(buf, start, end):
        if field == 1:  # dims: repeated int64, packed or not
            if wire == 2:
                pos, stop = value
                while pos < stop:
                    dim, pos = _varint(buf, pos)
                    dims.append(dim)
            else:
                dims.append(value)
        elif field == 2 and wire == 0:
            data_type = value
        elif field == 8 and wire == 2:
            name = _text(buf, value)
        elif field == 13 and wire == 2:  # StringStringEntryProto {key = 1, value = 2}
            entry = {f: _text(buf, v) for f, w, v in _fields(buf, *value) if w == 2}
            entries[entry.get(1, "")] = entry.get(2, "")
        elif field == 14 and wire == 0:
            location_kind = value
    if location_kind != _EXTERNAL or "location" not in entries:
        return None
    length = entries.get("length")
    return ExternalTensor(name, data_type, tuple(dims), entries["location"],
                          int(entries.get("offset") or 0), int(length) if length else None)


def external_tensors(model_path: str | Path) -> list[ExternalTensor]:
    """The initializers of ``model_path``'s main graph stored in external-data files
    (ModelProto.graph = 7, GraphProto.initializer = 5). Raises ValueError for a file that is
    not an ONNX protobuf."""
    with open(model_path, "rb") as f:
        if f.seek(0, 2) == 0:
            raise ValueError(f"{model_path} is empty")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            graphs = [v for field, wire, v in _fields(buf, 0, len(buf)) if field == 7 and wire == 2]
            if not graphs:
                raise ValueError(f"{model_path} has no graph")
            start, end = graphs[-1]
            return [t for field, wire, v in _fields(buf, start, end)
                    if field == 5 and wire == 2 and (t := _tensor(buf, *v)) is not None]


# -- sharing -----------------------------------------------------------------------------

_env_arena: bool | None = None  # None: not tried; True: registered; False: unavailable


def _env_cpu_arena() -> bool:
    """Register one process-wide CPU arena (once) for sessions with
    ``session.use_env_allocators``; False if this onnxruntime cannot."""
    global _env_arena
    if _env_arena is None:
        try:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                                     ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
            _env_arena = True
        except Exception as e:  # ORT's pybind errors; "already registered" is fine
            _env_arena = "already" in str(e).lower()
    return _env_arena


class SharedWeights:
    """The external-data tensors of several ONNX graphs, mapped once and wrapped as
    ``OrtValue`` s for :meth:`session_options`.

    A tensor is shared when its file is next to the graph, its entry lies inside the file,
    its length matches its shape and dtype and its offset is a multiple of the element size;
    any other one is left to ONNX Runtime (``skipped``). The mappings and values live as long
    as this object: keep it as long as the sessions (``StaticDecoder`` does, and hangs it on
    each session too)."""

    _MAP_MODE = "r"  # read-only, shared with the page cache (tests map copy-on-write: "c")

    def __init__(self, model_paths):
        self._maps: dict[Path, np.memmap] = {}
        self._arrays: dict[tuple, np.ndarray] = {}
        self._values: dict[tuple, ort.OrtValue] = {}
        self.names: dict[Path, dict[str, tuple]] = {}  # graph -> initializer name -> tensor key
        self.skipped: list[tuple[str, str]] = []  # (initializer, why it is left to ORT)
        for model_path in map(Path, model_paths):
            self.names[model_path] = {}
            for t in external_tensors(model_path):
                why = self._add(model_path, t)
                if why:
                    self.skipped.append((t.name, why))

    def _add(self, model_path: Path, t: ExternalTensor) -> str | None:
        path = (model_path.parent / t.location).resolve()
        if t.dtype is None:
            return f"ONNX data type {t.data_type}"
        if path.parent != model_path.parent.resolve() or not path.is_file():
            return f"{t.location} is not a file next to {model_path.name}"
        nbytes = int(np.prod(t.shape, dtype=np.int64)) * t.dtype.itemsize
        if t.length is not None and t.length != nbytes:
            return f"length {t.length} != {nbytes} bytes of its shape"
        if t.offset % t.dtype.itemsize:
            return f"offset {t.offset} not aligned to {t.dtype.itemsize} bytes"
        if path not in self._maps:
            size = path.stat().st_size
            self._maps[path] = (np.memmap(path, np.uint8, mode=self._MAP_MODE) if size
                                else np.zeros(0, np.uint8))
        data = self._maps[path]
        if t.offset + nbytes > data.size:
            return f"bytes {t.offset}..{t.offset + nbytes} past the end of {t.location}"
        key = (path, t.offset, nbytes, t.dtype.str, t.shape)
        if key not in self._values:
            array = data[t.offset:t.offset + nbytes].view(t.dtype).reshape(t.shape)
            self._arrays[key] = array
            self._values[key] = ort.OrtValue.ortvalue_from_numpy(array)  # no copy: the mapping
        self.names[model_path][t.name] = key
        return None

    def array(self, model_path, name: str) -> np.ndarray:
        """The mapped array ``model_path``'s session computes with for initializer ``name``."""
        return self._arrays[self.names[Path(model_path)][name]]

    @property
    def tensors(self) -> int:
        """Distinct tensors mapped (once each, whatever number of graphs use them)."""
        return len(self._values)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._arrays.values())

    def session_options(self, model_path) -> ort.SessionOptions:
        """Fresh options for ``model_path``'s session with its shared initializers."""
        opts = ort.SessionOptions()
        # A pre-packed kernel keeps its own copy of the weight in its layout, per session, and
        # the shared original stays alive: more memory than no sharing at all (measured).
        opts.add_session_config_entry("session.disable_prepacking", "1")
        if _env_cpu_arena():  # one activation arena for both sessions instead of one each
            opts.add_session_config_entry("session.use_env_allocators", "1")
        for name, key in self.names[Path(model_path)].items():
            opts.add_initializer(name, self._values[key])
        return opts

    def report(self, model_paths=None) -> dict:
        """JSON-ready: what is shared, per graph."""
        used = [Path(p) for p in (model_paths or self.names)]
        return {
            "enabled": True,
            "tensors": self.tensors,
            "bytes": self.nbytes,
            "files": sorted(p.name for p in self._maps),
            "per_graph": {p.name: len(self.names[p]) for p in used},
            "skipped": len(self.skipped),
            "prepacking": "disabled",
            "env_allocator": _env_cpu_arena(),
        }
