"""Static-shape export for NPUs (QNN HTP, NNAPI, CoreML): a prefill graph of a fixed chunk
and a one-token decode graph over a fixed-size KV cache, sharing one weights file.

NPU compilers want every shape fixed (QNN HTP rejects a dynamic one outright; NNAPI covered
36% of a dynamic export's nodes against 87% with fixed shapes, DESIGN.md). The graph
contract, for a context window ``C`` and a chunk ``S`` (``S = prefill_chunk`` or 1)::

    inputs : input_ids      [1, S] int64
             position_ids   [1, S] int64         true positions of the S tokens
             attention_bias [1, 1, S, C+S] float  0 = attend, dtype-min = masked
             (attention_bias_sliding: same, for sliding-window layers when a model mixes kinds)
             past_key_values.{i}.key / .value [1, kv_heads, C, head_dim]   the whole cache
    outputs: logits [1, S, vocab]
             kv_new.{i}.key / .value [1, kv_heads, S, head_dim]   the S new entries only

The cache is a fixed buffer whose slot ``j`` holds position ``j``; the runtime
(``slmedge.runtimes.sessions.static_decoder``) writes the new entries into their slots and builds the
additive bias from which slots are valid (the "validity mask"). Only new entries leave the
graph, so no ScatterND (NPU-hostile) is needed, and the mask is an input, so no int64 mask
arithmetic lands on the accelerator.

            past (C slots)         new (S)
    keys  [ 0 1 2 . . . . . . | n0 n1 .. ]   bias row q: 0 where slot < length
                                             (and inside the sliding window), 0 for
                                             new j <= q, dtype-min elsewhere

Weights: both graphs are exported separately and their initializers deduplicated by
content into one ``model.onnx.data``, so the weights are stored once.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from slmedge.exporter.architectures import ArchitectureSpec
from slmedge.exporter.onnx.convert import DEFAULT_OPSET, ExportFailed, _cache_kwarg, past_names

PREFILL_FILE = "prefill.onnx"
DECODE_FILE = "decode.onnx"
WEIGHTS_FILE = "model.onnx.data"
INLINE_BYTES = 1024  # smaller tensors stay inside the graph files


def kv_new_names(num_layers: int) -> list[str]:
    return [f"kv_new.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def mask_inputs(config) -> dict[str, int | None]:
    """Bias inputs of the graph -> sliding window they encode (None = full causal).

    One input when every layer attends the same way; two when a model mixes full and
    sliding-window layers (Gemma 3), whose masks transformers takes as a dict per kind."""
    window = getattr(config, "sliding_window", None)
    kinds = set(getattr(config, "layer_types", None) or [])
    if kinds == {"sliding_attention", "full_attention"}:
        return {"attention_bias": None, "attention_bias_sliding": int(window)}
    if kinds == {"sliding_attention"} or (not kinds and window is not None):
        return {"attention_bias": int(window)}
    return {"attention_bias": None}


class StaticKVWrapper(torch.nn.Module):
    """``(input_ids, position_ids, bias..., past...) -> (logits, kv_new...)``."""

    def __init__(self, model, num_layers: int, context: int, masks: dict[str, int | None]):
        super().__init__()
        self.model = model
        self.num_layers = num_layers
        self.context = context
        self.mask_names = list(masks)
        self.cache_kwarg = _cache_kwarg(model)

    def forward(self, input_ids, position_ids, biases, past_key_values):
        from transformers import DynamicCache

        cache = DynamicCache()
        for i in range(self.num_layers):
            cache.update(past_key_values[2 * i], past_key_values[2 * i + 1], i)
        if len(biases) == 2:  # transformers takes one 4-D mask per attention kind
            mask = {"full_attention": biases[0], "sliding_attention": biases[1]}
        else:
            mask = biases[0]  # a 4-D mask is used as given (masking_utils)
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=True,
            **{self.cache_kwarg: cache},
        )
        new = []
        for layer in out.past_key_values.layers:
            new += [layer.keys[:, :, self.context:, :], layer.values[:, :, self.context:, :]]
        return (out.logits, *new)


def causal_bias(length: int, n_valid: int, chunk: int, context: int, window: int | None,
                dtype=np.float32) -> np.ndarray:
    """The additive bias ``[1, 1, chunk, context + chunk]`` for ``n_valid`` new tokens after
    ``length`` cached ones (same rule as the runtime's; kept here for tracing inputs)."""
    from slmedge.runtimes.sessions.static_decoder import build_bias

    return build_bias(length, n_valid, chunk, context, window, dtype)


def _example(config, spec, chunk: int, context: int, dtype, masks, length: int):
    layers, kv_heads, head_dim = spec.kv_layout(config)
    n = chunk
    ids = torch.randint(0, config.vocab_size, (1, n), dtype=torch.int64)
    pos = torch.arange(length, length + n, dtype=torch.int64).reshape(1, n)
    np_dtype = np.float16 if dtype == torch.float16 else np.float32
    biases = tuple(torch.from_numpy(causal_bias(length, n, chunk, context, w, np_dtype))
                   for w in masks.values())
    past = tuple(torch.randn(1, kv_heads, context, head_dim, dtype=dtype)
                 for _ in range(2 * layers))
    return ids, pos, biases, past


@dataclass
class StaticExportInfo:
    context_length: int
    prefill_chunk: int
    files: list[str]
    mask_inputs: dict[str, int | None]
    input_names: dict[str, list[str]]
    output_names: list[str]
    weights_bytes: int
    weights_shared_bytes: int
    seconds: float
    extra: dict = field(default_factory=dict)

    def to_manifest(self) -> dict:
        return {
            "policy": "static",
            "context_length": self.context_length,
            "prefill_chunk": self.prefill_chunk,
            "prefill_file": PREFILL_FILE,
            "decode_file": DECODE_FILE,
            "weights_file": WEIGHTS_FILE,
            "mask_inputs": self.mask_inputs,
            "kv_outputs": "kv_new.{i}.key/value: the chunk's new entries; slot j = position j",
            "weights_bytes": self.weights_bytes,
            "weights_bytes_saved_by_sharing": self.weights_shared_bytes,
            **self.extra,
        }


def _export_one(wrapper, args, inputs, outputs, opset) -> onnx.ModelProto:
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                wrapper, args, dynamo=True, input_names=inputs, output_names=outputs,
                opset_version=opset, optimize=True, verbose=False, report=False,
            )
        except Exception as e:  # torch.export raises many types; report the last line
            raise ExportFailed(
                f"static-shape export failed: {str(e).strip().splitlines()[-1][:400]}"
            ) from e
    return program.model_proto


def constants_second(model: onnx.ModelProto) -> int:
    """Put the initializer operand of Mul / Add second; returns how many nodes changed.

    Workaround for onnxruntime-qnn 2.7.0 (HTP, also on the x86 emulator): the RMSNorm
    chain ``Mul(weight, x * rsqrt(mean(x^2) + eps))`` that torch exports fails with
    "Failed to finalize QNN graph. Error: QNN_COMMON_ERROR_MEM_ALLOC" while
    ``Mul(x * rsqrt(...), weight)`` runs (found by bisecting the decode graph; the same
    numbers either way, Mul and Add commute)."""
    constants = {t.name for t in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    changed = 0
    for node in model.graph.node:
        if node.op_type in ("Mul", "Add") and len(node.input) == 2 and not node.domain \
                and node.input[0] in constants and node.input[1] not in constants:
            a, b = node.input
            node.input[0], node.input[1] = b, a
            changed += 1
    return changed


#: What the manifest says about fused norms, and why a QNN profile asks for them.
FUSED_NORMS_WHY = (
    "QNN HTP computes float ops in fp16: the decomposed RMSNorm's Pow(x, 2) / ReduceMean "
    "overflow fp16 (max 65504) once |x| > 256 (SmolLM2-135M's residual reaches 23,138), while "
    "the HTP's RmsNorm op, which SimplifiedLayerNormalization maps to, stays finite "
    "(HTP emulator, |x| 25,000: relative error 5e-4 vs 21 for the chain)")


def fuse_rms_norms(model: onnx.ModelProto, weight_apart: bool = False
                   ) -> tuple[onnx.ModelProto, int]:
    """Every RMSNorm chain of ``model`` as one ``SimplifiedLayerNormalization``; returns the
    new model and how many norms were fused. Initializers may stay external (unloaded)::

        x -Cast(fp32)-Pow(2)-ReduceMean(-1)-Add(eps)-Sqrt-Reciprocal-+
        |                                                            Mul-Cast-Mul(w) -> y
        +------------------------------------------------------------+
                 =>  SimplifiedLayerNormalization(x, w, epsilon, stash_type=fp32) -> y

    The fusion rules are the dynamic pipeline's (:mod:`.passes.rms_norm`, onnxscript's); on
    CPU ONNX Runtime makes the same fusion itself, so the numbers there do not change.

    ``weight_apart``: ``SimplifiedLayerNormalization(x, ones) -> Mul(w)`` instead, for graphs
    that will be QDQ-quantized. Workaround for onnxruntime-qnn 2.7.0 (HTP emulator): a QDQ
    SimplifiedLayerNormalization with its weight inside, feeding a MatMul whose other operand
    is 16-bit QDQ computed in the graph (the tied lm_head: Transpose of the embedding), fails
    at 64 rows with "Failed to finalize QNN graph. Error: QNN_COMMON_ERROR_MEM_ALLOC"
    (SmolLM2's a16w8 prefill; reproduced on a 12-node graph; 1 row, or the weight as a
    separate Mul, compile)."""
    import onnx_ir as ir

    from slmedge.exporter.passes.rms_norm import RmsNormFusion

    graph = ir.from_proto(model)
    fusion = RmsNormFusion()
    fusion(graph)
    fused = ir.to_proto(graph)
    if weight_apart and fusion.count:
        _norm_weights_apart(fused)
    return fused, fusion.count


def _norm_weights_apart(model: onnx.ModelProto) -> None:
    """``SimplifiedLayerNormalization(x, w) -> y`` as ``SimplifiedLayerNormalization(x, 1)``
    then ``Mul(., w) -> y`` (same numbers; see :func:`fuse_rms_norms`)."""
    from onnx import helper

    types = {t.name: (t.data_type, tuple(t.dims)) for t in model.graph.initializer}
    ones: dict[tuple, str] = {}
    nodes = []
    for node in model.graph.node:
        nodes.append(node)
        if node.op_type != "SimplifiedLayerNormalization" or node.domain or \
                node.input[1] not in types or len(node.output) != 1:
            continue
        data_type, dims = types[node.input[1]]
        if (data_type, dims) not in ones:
            name = f"rms_norm_ones_{'x'.join(map(str, dims))}_{data_type}"
            array = np.ones(dims, helper.tensor_dtype_to_np_dtype(data_type))
            model.graph.initializer.append(numpy_helper.from_array(array, name))
            ones[(data_type, dims)] = name
        weight, out = node.input[1], node.output[0]
        node.input[1] = ones[(data_type, dims)]
        node.output[0] = f"{out}_unscaled"
        nodes.append(helper.make_node("Mul", [node.output[0], weight], [out],
                                      name=f"{node.name}_weight"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def fuse_artifact_norms(root: Path) -> dict[str, int]:
    """:func:`fuse_rms_norms` on the prefill and decode graphs of a written static artifact;
    the shared weights file is left as it is, the manifest gets ``static.norms`` and the new
    sizes and hashes of the graph files. Returns the count per graph (0: nothing to fuse)."""
    from slmedge.runtimes.artifact import MANIFEST_NAME, read_manifest_json
    from slmedge.runtimes.errors import UsageError
    from slmedge.runtimes.manifest_schema import validate_manifest

    from slmedge.exporter.manifest import save_manifest, sha256_file

    root = Path(root)
    manifest = read_manifest_json(root / MANIFEST_NAME)  # amended and written back as JSON
    info = validate_manifest(manifest, root / MANIFEST_NAME, root)
    if info.static is None:
        raise UsageError(f"{root} is not a static-shape export (its manifest has no static "
                         "section); export it with a static-shape profile (slmedge export "
                         "--profile NAME)")
    static = manifest["static"]
    counts = {}
    for kind in ("prefill", "decode"):
        name = static[f"{kind}_file"]
        fused, counts[kind] = fuse_rms_norms(onnx.load(str(root / name), load_external_data=False))
        if counts[kind]:
            onnx.save(fused, str(root / name))
            if name in manifest.get("files", {}):
                manifest["files"][name].update(sha256=sha256_file(root / name),
                                               size=(root / name).stat().st_size)
    if any(counts.values()):
        static["norms"] = {**norms_manifest(counts), "applied_to_written_artifact": True}
        save_manifest(root, manifest)
    return counts


def norms_manifest(counts: dict[str, int], weight_apart: bool = False) -> dict:
    doc = {"fused": "SimplifiedLayerNormalization", "count": counts, "why": FUSED_NORMS_WHY}
    if weight_apart:
        doc["weight"] = ("a separate Mul after the norm (QDQ graphs: the HTP could not finalize "
                         "a QDQ norm with its weight feeding the tied lm_head at 64 rows)")
    return doc


def share_weights(models: dict[str, onnx.ModelProto], directory: Path) -> tuple[int, int]:
    """Move the initializers of ``models`` into one ``WEIGHTS_FILE``, each distinct tensor once
    (matched by dtype, shape and bytes), and save every model beside it.
    Returns (bytes written, bytes saved by sharing)."""
    index: dict[tuple, tuple[int, int]] = {}
    offset = saved = 0
    with open(directory / WEIGHTS_FILE, "wb") as data:
        for model in models.values():
            for i, tensor in enumerate(model.graph.initializer):
                array = numpy_helper.to_array(tensor)
                raw = np.ascontiguousarray(array).tobytes()
                if len(raw) < INLINE_BYTES:
                    continue
                key = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(raw).hexdigest())
                if key in index:
                    saved += len(raw)
                else:
                    pad = (-offset) % 64  # aligned for mmap
                    data.write(b"\0" * pad)
                    offset += pad
                    data.write(raw)
                    index[key] = (offset, len(raw))
                    offset += len(raw)
                at, length = index[key]
                moved = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type,
                                         dims=tensor.dims)
                moved.data_location = onnx.TensorProto.EXTERNAL
                for key_, value in (("location", WEIGHTS_FILE), ("offset", str(at)),
                                    ("length", str(length))):
                    entry = moved.external_data.add()
                    entry.key, entry.value = key_, value
                model.graph.initializer[i].CopyFrom(moved)
    for name, model in models.items():
        onnx.save(model, directory / name)
    return offset, saved


def export_static(model, spec: type[ArchitectureSpec], directory: Path, *, context_length: int,
                  prefill_chunk: int, opset: int = DEFAULT_OPSET,
                  fuse_norms: bool = False, norm_weight_apart: bool = False) -> StaticExportInfo:
    """Export the prefill and decode graphs of ``model`` into ``directory``; ``fuse_norms``:
    RMSNorm chains as ``SimplifiedLayerNormalization`` (:func:`fuse_rms_norms`, with
    ``norm_weight_apart`` for graphs to be QDQ-quantized)."""
    config = model.config
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions",
                                                                          None)
    if max_pos and context_length > max_pos:
        from slmedge.runtimes.errors import UsageError

        raise UsageError(f"context_length {context_length} exceeds the model's "
                         f"{max_pos} positions; pick a profile with a smaller context_length")
    layers, _, _ = spec.kv_layout(config)
    dtype = next(model.parameters()).dtype
    masks = mask_inputs(config)
    wrapper = StaticKVWrapper(model, layers, context_length, masks).eval()
    inputs = ["input_ids", "position_ids", *masks, *past_names(layers)]
    outputs = ["logits", *kv_new_names(layers)]
    t0 = time.perf_counter()
    protos, fused = {}, {}
    with spec.export_patches():
        for name, chunk in ((PREFILL_FILE, prefill_chunk), (DECODE_FILE, 1)):
            args = _example(config, spec, chunk, context_length, dtype, masks,
                            length=min(3, context_length - chunk))
            protos[name] = _export_one(wrapper, args, inputs, outputs, opset)
            if fuse_norms:
                kind = "prefill" if name == PREFILL_FILE else "decode"
                protos[name], fused[kind] = fuse_rms_norms(protos[name], norm_weight_apart)
            constants_second(protos[name])
    written, saved = share_weights(protos, directory)
    return StaticExportInfo(
        context_length=context_length, prefill_chunk=prefill_chunk,
        files=[PREFILL_FILE, DECODE_FILE, WEIGHTS_FILE], mask_inputs=masks,
        input_names={"prefill": inputs, "decode": inputs}, output_names=outputs,
        weights_bytes=written, weights_shared_bytes=saved, seconds=time.perf_counter() - t0,
        extra={"norms": norms_manifest(fused, norm_weight_apart)} if fuse_norms else {},
    )
