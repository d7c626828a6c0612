"""Write an ``onnx_ir`` model one tensor at a time, with progress per layer.

Weights may be lazy (``lazy_weights``): each is materialized, written and dropped before
the next, both into ``model.onnx.data`` (``onnx_ir.save`` with external data writes
serially) and into a single ``model.onnx``, which :func:`_save_single_file` streams as
protobuf: ``onnx_ir.save`` without external data builds the whole ``ModelProto`` and then
its serialized bytes, two copies of every weight at once.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir

from slmedge.exporter.quantize.external_data import encode_varint

Say = Callable[[str], None]

_LAYER = re.compile(r"\.(?:layers|h)\.(\d+)\.")
_INITIALIZER_TAG = bytes([(5 << 3) | 2])  # GraphProto.initializer, length-delimited
_GRAPH_TAG = bytes([(7 << 3) | 2])  # ModelProto.graph
_RAW_DATA_TAG = bytes([(9 << 3) | 2])  # TensorProto.raw_data


def _nbytes(tensor: ir.TensorProtocol) -> int:
    return int(tensor.size * tensor.dtype.itemsize) if tensor.dtype.bitwidth >= 8 else \
        len(tensor.tobytes())


class WriteProgress:
    """Reports weight writing to ``say``: one line per decoder layer (and at the end), with
    bytes written, throughput and an ETA from the bytes still to write."""

    def __init__(self, say: Say | None, tensors: list[ir.TensorProtocol], layers: int | None = None):
        self.say = say
        self.total = sum(_nbytes(t) for t in tensors) or 1
        self.layers = layers
        self.done = 0
        self.count = 0
        self.tensors = len(tensors)
        self.layer = -1
        self.t0 = time.perf_counter()

    def __call__(self, tensor: ir.TensorProtocol) -> None:
        self.done += _nbytes(tensor)
        self.count += 1
        layer = tensor_layer(tensor)
        finished = self.count == self.tensors
        if self.say is None or not (finished or (layer is not None and layer > self.layer)):
            return
        if layer is not None:
            self.layer = layer
        elapsed = time.perf_counter() - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        where = "all layers" if finished else (
            f"layer {layer + 1}/{self.layers}" if self.layers else f"layer {layer + 1}")
        self.say(f"writing weights: {where}, {self.done / 1e6:.0f}/{self.total / 1e6:.0f} MB "
                 f"({100 * self.done / self.total:.0f}%), {rate / 1e6:.0f} MB/s, "
                 f"ETA {eta:.0f} s")


def save_graph(model: ir.Model, path: Path, *, external_data: bool, say: Say | None = None,
               layers: int | None = None) -> None:
    """Save ``model`` to ``path`` (weights in ``path.data`` when ``external_data``), reading
    each lazy weight once, when it is written."""
    path = Path(path)
    _order_by_layer(model.graph)
    tensors = [v.const_value for v in model.graph.initializers.values() if v.const_value is not None]
    progress = WriteProgress(say, tensors, layers)
    with _prefetched(model.graph):
        if external_data:
            ir.save(model, str(path), external_data=path.name + ".data",
                    size_threshold_bytes=1024, callback=lambda tensor, _info: progress(tensor))
        else:
            _save_single_file(model, path, progress)


#: a lazy weight is computed ahead of the writer only up to this size (the memory it costs)
PREFETCH_MAX_BYTES = 256 << 20


class _Prefetch:
    """Each lazy weight computed in a worker thread while the writer writes the one before
    (reading from the checkpoint, converting and transposing overlap the file writes; numpy,
    torch and file I/O release the GIL). At most one weight is computed ahead, and only one
    of up to :data:`PREFETCH_MAX_BYTES`; a weight asked for out of order, or twice, is
    computed then, as without prefetching: the bytes are the same either way."""

    def __init__(self, lazies: list[ir.LazyTensor], pool):
        self.lazies, self.pool = lazies, pool
        self.ahead: dict[int, object] = {}  # index -> Future of its ir.Tensor
        self.started: set[int] = set()

    def _submit(self, i: int) -> None:
        if i < len(self.lazies) and i not in self.started and \
                _nbytes(self.lazies[i]) <= PREFETCH_MAX_BYTES:
            self.started.add(i)
            self.ahead[i] = self.pool.submit(self.lazies[i]._evaluate)

    def get(self, i: int):
        self._submit(i + 1)  # the next weight, while this one is finished and written
        future = self.ahead.pop(i, None)
        if future is None:
            self.started.add(i)
            return self.lazies[i]._evaluate()
        return future.result()


@contextlib.contextmanager
def _prefetched(graph: ir.Graph):
    """The graph's lazy initializers (:class:`lazy_weights.WeightTensor` and other
    ``LazyTensor``) replaced, while the block runs, by ones served by :class:`_Prefetch`."""
    from concurrent.futures import ThreadPoolExecutor

    from .lazy_weights import WeightTensor

    values = [v for v in graph.initializers.values() if isinstance(v.const_value, ir.LazyTensor)]
    originals = [v.const_value for v in values]
    if len(values) < 2:
        yield
        return
    with ThreadPoolExecutor(1, thread_name_prefix="slmedge-prefetch") as pool:
        prefetch = _Prefetch(originals, pool)
        try:
            for i, (value, lazy) in enumerate(zip(values, originals)):
                value.const_value = WeightTensor(lambda i=i: prefetch.get(i), lazy.dtype,
                                                 lazy.shape, name=lazy.name,
                                                 layer=tensor_layer(lazy))
            yield
        finally:
            for value, lazy in zip(values, originals):
                value.const_value = lazy
            for future in prefetch.ahead.values():
                future.cancel()


def graph_without_weights(model: ir.Model, inline_below: int = 1024):
    """``model``'s ``ModelProto`` as :func:`save_graph` would write it and the quantizer's
    ``load_graph`` read it back, without writing or reading a weight: every initializer of
    ``inline_below`` bytes or more is an external-data reference to
    ``external_data.UNWRITTEN`` (offsets as if packed back to back), the smaller ones are
    inline. Returns (proto, ``UnwrittenSource`` computing each referenced tensor on demand
    from its lazy weight). Quantize on write (issue 15): the fp32 graph of a 3B model is
    14.5 GB of ``.data``, an 8B one 32 GB, more than the disk here holds."""
    from slmedge.exporter.quantize.external_data import UNWRITTEN, UnwrittenSource

    _order_by_layer(model.graph)  # the initializers in the order save_graph writes them
    values = [v for v in model.graph.initializers.values()
              if v.const_value is not None and _nbytes(v.const_value) >= inline_below]
    held = [v.const_value for v in values]
    offset = 0
    try:
        for value, tensor in zip(values, held, strict=True):
            n = _nbytes(tensor)
            value.const_value = ir.ExternalTensor(UNWRITTEN, offset, n, tensor.dtype,
                                                  shape=tensor.shape, name=tensor.name,
                                                  base_dir="")
            offset += n
        proto = ir.serde.serialize_model(model)
    finally:
        for value, tensor in zip(values, held, strict=True):
            value.const_value = tensor
    return proto, UnwrittenSource({v.name: t.numpy for v, t in zip(values, held, strict=True)})


def tensor_layer(tensor: ir.TensorProtocol) -> int | None:
    """The decoder layer of a weight: recorded by lazy_weights, else read from its name."""
    layer = getattr(tensor, "layer", None)
    if layer is None:
        match = _LAYER.search(tensor.name or "")
        layer = int(match.group(1)) if match else None
    return layer


def _order_by_layer(graph: ir.Graph) -> None:
    """Initializers in layer order (the others first, in their order): the file is written,
    and progress reported, layer after layer."""
    values = list(graph.initializers.values())
    keys = [tensor_layer(v.const_value) if v.const_value is not None else None for v in values]
    order = sorted(range(len(values)), key=lambda i: (-1 if keys[i] is None else keys[i], i))
    if order == list(range(len(values))):
        return
    graph.initializers.clear()
    for i in order:
        graph.register_initializer(values[i])


def _save_single_file(model: ir.Model, path: Path, progress: WriteProgress) -> None:
    """A single-file ``ModelProto`` written field by field: the graph's proto without its
    initializers, then each initializer's ``TensorProto`` as it is materialized. Protobuf
    parsers accept fields in any order, so the file is the same model as
    ``onnx_ir.save`` writes (tests compare the tensors)."""
    import onnx

    graph = model.graph
    values = list(graph.initializers.values())
    graph.initializers.clear()
    try:
        proto = ir.serde.serialize_model(model)
    finally:
        for value in values:
            graph.register_initializer(value)
    # onnx_ir writes the initializers' types and shapes into value_info first: same here.
    infos = []
    for value in values:
        if value.name not in {v.name for v in graph.inputs} and (
                value.type is not None or value.shape is not None):
            info = onnx.ValueInfoProto()
            ir.serde.serialize_value_into(info, value)
            infos.append(info)
    if infos:
        infos += list(proto.graph.value_info)
        proto.graph.ClearField("value_info")
        proto.graph.value_info.extend(infos)
    graph_bytes = proto.graph.SerializeToString()
    proto.ClearField("graph")
    model_bytes = proto.SerializeToString()

    headers = []
    for value in values:
        tensor = value.const_value
        header = onnx.TensorProto(name=value.name, dims=[int(d) for d in tensor.shape],
                                  data_type=tensor.dtype.value).SerializeToString()
        n = _nbytes(tensor)
        headers.append((tensor, header, n, len(header) + 1 + len(encode_varint(n)) + n))
    graph_len = len(graph_bytes) + sum(1 + len(encode_varint(size)) + size for *_, size in headers)
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb") as f:
        f.write(model_bytes)
        f.write(_GRAPH_TAG + encode_varint(graph_len))
        f.write(graph_bytes)
        for tensor, header, n, size in headers:
            array = tensor.numpy()  # written from its buffer: no second copy as bytes
            data = memoryview(np.ascontiguousarray(array).reshape(-1)).cast("B") \
                if array.dtype.kind in "biuf" else tensor.tobytes()
            if len(data) != n:
                raise ValueError(f"tensor {tensor.name}: {len(data)} bytes, its shape and type "
                                 f"imply {n}")
            f.write(_INITIALIZER_TAG + encode_varint(size) + header + _RAW_DATA_TAG + encode_varint(n))
            f.write(data)
            del data, array
            progress(tensor)
    tmp.replace(path)
