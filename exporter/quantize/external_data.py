"""Tensor bytes outside the graph: read one initializer at a time, append one at a time.

A graph loaded with ``onnx.load(path, load_external_data=False)`` holds every large
initializer as a reference (``location``, ``offset``, ``length`` into a ``.data`` file
beside it). :class:`TensorSource` reads one such tensor into its own buffer (a positioned
read, not a memory map: the pages are the process's own and are freed with the array, so
the peak resident memory is the tensors in hand, never the file). :class:`DataFileWriter`
appends tensors to an external-data file as they are computed and returns the
references for the graph. Nothing here holds more than the tensor it is given.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

#: tensors from this size up start at a page boundary in the data file (mmap-friendly, as
#: onnx's own writer does); smaller ones are packed back to back
ALIGN_FROM = 1 << 20
PAGE = 4096
#: initializers below this many bytes stay inside the graph (shapes, split sizes, norms of
#: tiny models), as ``onnx.save_model``'s ``size_threshold`` keeps them
INLINE_BELOW = 1024


def set_reference(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    """Point ``tensor`` at ``length`` bytes from ``offset`` of ``location`` (onnx's own
    ``set_external_data`` insists on inline data first, which is what this avoids)."""
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)


def tensor_nbytes(tensor: TensorProto) -> int:
    """Bytes of ``tensor``'s data from its type and shape (no data read)."""
    count = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
    if tensor.data_type in (TensorProto.INT4, TensorProto.UINT4):
        return (count + 1) // 2
    return count * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def is_external(tensor: TensorProto) -> bool:
    return uses_external_data(tensor)


class TensorSource:
    """Reads initializers of a graph loaded without its external data, one at a time."""

    def __init__(self, base_dir: Path):
        self.base_dir = Path(base_dir)

    def file_of(self, tensor: TensorProto) -> Path:
        return self.base_dir / ExternalDataInfo(tensor).location

    def read(self, tensor: TensorProto) -> np.ndarray:
        """``tensor``'s values as a numpy array of its own (external or inline data)."""
        if not uses_external_data(tensor):
            return numpy_helper.to_array(tensor)
        info = ExternalDataInfo(tensor)
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        if tensor.data_type in (TensorProto.INT4, TensorProto.UINT4, TensorProto.BFLOAT16):
            raise ValueError(f"{tensor.name}: reading {TensorProto.DataType.Name(tensor.data_type)} "
                             "external data is not supported by the streaming quantizer")
        count = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
        length = info.length if info.length is not None else count * dtype.itemsize
        if length != count * dtype.itemsize:
            raise ValueError(f"{tensor.name}: external data length {length} does not match its "
                             f"shape {list(tensor.dims)} of {dtype}")
        path = self.file_of(tensor)
        with open(path, "rb") as f:
            arr = np.fromfile(f, dtype=dtype, count=count, offset=info.offset or 0)
        if arr.size != count:
            raise ValueError(f"{tensor.name}: {path} ends before the tensor's {length} bytes "
                             f"at offset {info.offset or 0} (truncated file?)")
        return arr.reshape(tuple(tensor.dims))

    def rows(self, tensor: TensorProto, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of an external 2-D tensor (a positioned read of just them)."""
        info = ExternalDataInfo(tensor)
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        k = int(tensor.dims[1])
        with open(self.file_of(tensor), "rb") as f:
            arr = np.fromfile(f, dtype=dtype, count=(stop - start) * k,
                              offset=(info.offset or 0) + start * k * dtype.itemsize)
        return arr.reshape(stop - start, k)

    def matrix(self, tensor: TensorProto) -> np.ndarray:
        """An external tensor as a read-only memory map (a reader takes the slices it needs;
        the pages are the file's, not a copy)."""
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        return np.memmap(self.file_of(tensor), dtype=dtype, mode="r",
                         offset=ExternalDataInfo(tensor).offset or 0,
                         shape=tuple(int(d) for d in tensor.dims))

    def copy_bytes(self, tensor: TensorProto, out, chunk: int = 64 << 20) -> int:
        """Copy an external tensor's bytes to the open file ``out`` in chunks; returns length."""
        info = ExternalDataInfo(tensor)
        length = info.length if info.length is not None else tensor_nbytes(tensor)
        with open(self.file_of(tensor), "rb") as f:
            f.seek(info.offset or 0)
            left = length
            while left:
                buf = f.read(min(chunk, left))
                if not buf:
                    raise ValueError(f"{tensor.name}: {self.file_of(tensor)} is truncated")
                out.write(buf)
                left -= len(buf)
        return length


#: the ``location`` of the references :class:`UnwrittenSource` answers: no file by this name
#: is ever written, so a reader that went to the disk for one would fail loudly
UNWRITTEN = "(not written: read from the export's source)"


class UnwrittenSource(TensorSource):
    """Initializers of a graph that was never written (quantize on write): each read by name
    through a callable that computes it (the export's lazy weights: one tensor read from the
    checkpoint, converted, packed). The graph refers to them as external data at location
    :data:`UNWRITTEN`; the quantizer reads them through the same methods as from a file."""

    def __init__(self, tensors: dict[str, Callable[[], np.ndarray]]):
        super().__init__(Path("."))
        self.tensors = tensors
        self._rows: tuple[str, np.ndarray] | None = None  # the table being read by rows

    def file_of(self, tensor: TensorProto) -> Path:
        raise ValueError(f"{tensor.name} was never written to a file (quantize on write): read it "
                         "through UnwrittenSource.read / rows / matrix")

    def read(self, tensor: TensorProto) -> np.ndarray:
        if tensor.name not in self.tensors:
            raise ValueError(f"{tensor.name} is not among the {len(self.tensors)} unwritten "
                             "tensors of this graph")
        arr = np.asarray(self.tensors[tensor.name]())
        want = tuple(int(d) for d in tensor.dims)
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        if arr.shape != want or arr.dtype != dtype:
            raise ValueError(f"{tensor.name}: computed {arr.dtype} {list(arr.shape)}, the graph "
                             f"declares {dtype} {list(want)}")
        return arr

    def rows(self, tensor: TensorProto, start: int, stop: int) -> np.ndarray:
        """Rows of the tensor, computed once for a pass over all its rows (kept until the
        last rows are read: a table read block by block is not recomputed per block)."""
        if self._rows is None or self._rows[0] != tensor.name:
            self._rows = None  # the previous table first
            self._rows = (tensor.name, self.read(tensor))
        arr = self._rows[1]
        if stop >= arr.shape[0]:
            self._rows = None
        return arr[start:stop]

    def matrix(self, tensor: TensorProto) -> np.ndarray:
        return self.read(tensor)

    def copy_bytes(self, tensor: TensorProto, out, chunk: int = 64 << 20) -> int:
        arr = np.ascontiguousarray(self.read(tensor))
        out.write(memoryview(arr.reshape(-1).view(np.uint8)))
        return arr.nbytes


class DataFileWriter:
    """Appends tensor bytes to one external-data file; hands back the graph's references."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.location = self.path.name
        self._f = open(self.path, "wb")  # noqa: SIM115 (closed by close())
        self.bytes_written = 0
        self.names: set[str] = set()  # tensors whose bytes this writer holds

    def _start(self, nbytes: int) -> int:
        pos = self._f.tell()
        if nbytes >= ALIGN_FROM and pos % PAGE:
            self._f.write(b"\0" * (PAGE - pos % PAGE))
            pos = self._f.tell()
        return pos

    def _reference(self, name: str, data_type: int, dims, offset: int) -> TensorProto:
        length = self._f.tell() - offset
        self.bytes_written += length
        self.names.add(name)
        tensor = TensorProto(name=name, data_type=data_type, dims=list(dims))
        set_reference(tensor, self.location, offset, length)
        return tensor

    def add_array(self, name: str, array: np.ndarray, data_type: int | None = None) -> TensorProto:
        """Append ``array`` (its little-endian bytes, C order); returns the reference."""
        array = np.ascontiguousarray(array)
        if data_type is None:
            data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        offset = self._start(array.nbytes)
        self._f.write(memoryview(array.reshape(-1).view(np.uint8)))
        return self._reference(name, data_type, array.shape, offset)

    def add_proto(self, tensor: TensorProto, source: TensorSource | None = None) -> TensorProto:
        """Move ``tensor``'s data (inline raw/typed fields, or external in ``source``) here."""
        if uses_external_data(tensor):
            if source is None:
                raise ValueError(f"{tensor.name}: external tensor without a source to read it from")
            offset = self._start(tensor_nbytes(tensor))
            source.copy_bytes(tensor, self._f)
            return self._reference(tensor.name, tensor.data_type, tensor.dims, offset)
        if tensor.HasField("raw_data"):
            offset = self._start(len(tensor.raw_data))
            self._f.write(tensor.raw_data)
            return self._reference(tensor.name, tensor.data_type, tensor.dims, offset)
        return self.add_array(tensor.name, numpy_helper.to_array(tensor), tensor.data_type)

    def begin(self, nbytes: int) -> int:
        """Start a tensor written in pieces (:meth:`append`); returns its offset."""
        return self._start(nbytes)

    def append(self, array: np.ndarray) -> None:
        self._f.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))

    def end(self, name: str, data_type: int, dims, offset: int) -> TensorProto:
        return self._reference(name, data_type, dims, offset)

    def flush(self) -> None:
        """Make everything appended so far readable through another handle."""
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def has_external_data(path: Path) -> bool:
    """Whether the ONNX file at ``path`` keeps any initializer outside the graph."""
    model = onnx.load(str(path), load_external_data=False)
    return any(uses_external_data(t) for t in model.graph.initializer)


def data_files(path: Path) -> list[Path]:
    """The external-data files the graph at ``path`` refers to (beside it)."""
    model = onnx.load(str(path), load_external_data=False)
    names = {ExternalDataInfo(t).location for t in model.graph.initializer if uses_external_data(t)}
    return [Path(path).parent / n for n in sorted(names)]


def move_model(src: Path, dst: Path) -> list[Path]:
    """Move an ONNX graph and its one external-data file to ``dst`` (the data file then named
    ``<dst name>.data``, the graph's references rewritten). Returns the files written."""
    src, dst = Path(src), Path(dst)
    files = data_files(src)
    if not files:
        os.replace(src, dst)
        return [dst]
    if len(files) > 1:
        raise ValueError(f"{src} refers to {len(files)} external-data files; expected one")
    model = onnx.load(str(src), load_external_data=False)
    location = dst.name + ".data"
    for t in model.graph.initializer:
        if uses_external_data(t):
            info = ExternalDataInfo(t)
            set_reference(t, location, info.offset, info.length)
    shutil.move(str(files[0]), str(dst.parent / location))
    onnx.save_model(model, str(dst))
    if src != dst:
        src.unlink()
    return [dst, dst.parent / location]


# -- a single-file graph read without its weights ------------------------------------------
# ``onnx.load(path, load_external_data=False)`` still parses every inline ``raw_data`` into
# memory (a 2 GB fp32 graph: 2 GB). ``load_graph`` walks the protobuf wire format over a
# memory map instead and turns each large inline ``raw_data`` into an external-data
# reference into the .onnx file itself (location = its own name, offset, length), which
# TensorSource then reads one tensor at a time. Field numbers: onnx.proto3 (ModelProto.graph
# = 7, GraphProto.initializer = 5, TensorProto.raw_data = 9).
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9


def _varint(buf, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def encode_varint(value: int) -> bytes:
    """A protobuf base-128 varint (field keys and lengths of the files written here and in
    qdq_writer)."""
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _fields(buf, start: int, end: int):
    """(field number, wire type, field start, value start, value end) of each field."""
    pos = start
    while pos < end:
        field_start = pos
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, value_end = _varint(buf, pos)
        elif wire == 1:
            value_end = pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value_end = pos + length
        elif wire == 5:
            value_end = pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} at byte {field_start}")
        yield number, wire, field_start, pos, value_end
        pos = value_end


def _length_delimited(number: int, payload: bytes) -> bytes:
    return encode_varint(number << 3 | 2) + encode_varint(len(payload)) + payload


def load_graph(path: Path, inline_below: int = INLINE_BELOW) -> onnx.ModelProto:
    """The model at ``path`` without the bytes of its large initializers: inline ones of
    ``inline_below`` bytes or more become references into ``path`` itself; external ones
    stay as they are. Peak memory: the graph's structure, not its weights."""
    import mmap

    path = Path(path)
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty")
    moved: list[tuple[int, int, int]] = []  # (initializer index, offset, length)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        model_parts = []
        for number, wire, fstart, vstart, vend in _fields(buf, 0, len(buf)):
            if number != _MODEL_GRAPH or wire != 2:
                model_parts.append(bytes(buf[fstart:vend]))
                continue
            graph_parts, index = [], 0
            for g_number, g_wire, g_fstart, g_vstart, g_vend in _fields(buf, vstart, vend):
                if g_number != _GRAPH_INITIALIZER or g_wire != 2:
                    graph_parts.append(bytes(buf[g_fstart:g_vend]))
                    continue
                kept = []
                for t_number, t_wire, t_fstart, t_vstart, t_vend in _fields(buf, g_vstart, g_vend):
                    if (t_number == _TENSOR_RAW_DATA and t_wire == 2
                            and t_vend - t_vstart >= inline_below):
                        moved.append((index, t_vstart, t_vend - t_vstart))
                    else:
                        kept.append(bytes(buf[t_fstart:t_vend]))
                graph_parts.append(_length_delimited(_GRAPH_INITIALIZER, b"".join(kept)))
                index += 1
            model_parts.append(_length_delimited(_MODEL_GRAPH, b"".join(graph_parts)))
    model = onnx.ModelProto()
    model.ParseFromString(b"".join(model_parts))
    for index, offset, length in moved:
        set_reference(model.graph.initializer[index], path.name, offset, length)
    return model
