"""Weight-only quantization that streams: one tensor in memory at a time, any model size.

:func:`core.quantize_model` loads the whole graph with its weights (and ONNX Runtime's
quantizer copies it again): ~3x the fp32 model at its peak, and its output must fit in one
2 GB protobuf. :func:`quantize_file_streaming` reads the graph alone
(``external_data.load_graph``: large inline weights stay on disk too), prepares it as
today's path does but without the weights (:mod:`.lazy_graph`), then walks the nodes: each
weight is read from the source (by offset and length, from its external-data file or from
inside the .onnx file), quantized by ONNX Runtime's own
per-tensor code, appended to ``<dst>.data`` and dropped. Every tensor that stays float is
copied across in chunks. Peak memory: the graph plus a few copies of the largest weight.

Same numbers as today's path: the per-tensor calls are the ones
``MatMulNBitsQuantizer`` makes (RTN: ``DefaultWeightOnlyQuantizer.qbits_block_quant``,
i.e. ``quantize_matmul_4bits`` / ``_8bits``; HQQ: hqq.py, the bytes of
``HQQWeightOnlyQuantizer.quantize`` several times faster), the
``MatMulNBits`` nodes carry the same names and attributes, the embedding goes through
:func:`weight_only.embedding_int8` (row blocks at a time) or ONNX Runtime's
``quantize_gather``, and the graph passes after quantization (``share_tied_int4_table``,
``fold_zero_points``) are today's functions with the few tensors they read
brought inline. tests/parity/test_streaming_quant.py checks byte-identical initializers
and equal logits against ``quantize_model`` on every architecture.

A source with quantized blocks of its own (a GGUF's Q4_0 / Q8_0: ``exact``) has them written
as they are wherever the recipe's bits and block size are theirs (no dequantize-requantize);
the report's ``gguf_exact`` names those tensors and says why any others were quantized again.

Not streamed (they need every weight, calibration activations, or ``quantize_dynamic``):
k_quant, gptq, gptq-act, int8 qoperator, int8-static, a16w8, the split ``lm_head``.

A large tied table split by token frequency (``large_table_int8_tokens``, tied_split.py) is
streamed: one calibration pass before the weights (the calibration text's token counts, and
the lm_head input's Hessian from the fp32 graph), the body quantized with the head left
float, then the head's weight read once and the head and lookup rewritten.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from slmedge.device_profiles.schema import QDQ_SCHEMES
from slmedge.runtimes.errors import UnsupportedOp

from .core import QuantReport, nbits_levels, quiet_ort_logging, weight_only_table
from .external_data import (
    INLINE_BELOW, DataFileWriter, TensorSource, is_external, load_graph, tensor_nbytes,
)
from .fold_zero_points import fold_and_say
from .gguf_blocks import NBitsBlocks, concat_blocks, narrow_wider_blocks
from .graph import GraphFacts, _module_and_layer, analyze, drop_unused_initializers
from .hqq import hqq_quantize
from .lazy_graph import LazyWeights, fold_weight_transposes, pack_shared_input_matmuls, split_gemms
from .recipe import Int4Algorithm, Int8Format, QuantRecipe, QuantScheme, TensorPrecision
from . import tied_table
from .tied_split import plan_split, split_streamed
from .tied_table import share_tied_int4_table, share_tied_nbits_table, tied_gathers
from .weight_only import embedding_int8

Say = Callable[[str], None]
#: ``exact(module)``: a source's own quantized blocks of the weight of that HF module
#: (``W`` ``[K, N]``, e.g. from a GGUF's Q4_0 / Q8_0 tensor: gguf_blocks.py), a sentence
#: saying why its quantized tensor cannot be kept (then it is quantized again), or None
#: for a float tensor
ExactBlocks = Callable[[str], "NBitsBlocks | str | None"]
#: embedding rows quantized per call of ``embedding_int8`` (bounded memory, same bytes)
EMBEDDING_ROWS = 8192
STREAMED_ALGORITHMS = (Int4Algorithm.rtn, Int4Algorithm.hqq)
#: RTN quantizes a weight this many values (columns of K) at a time: the blocks run along K
#: per output column, so column slices give the same bytes in order, and a transposed
#: source (the tied lm_head) is never copied whole
CHUNK_VALUES = 8 << 20


def streaming_unsupported(recipe: QuantRecipe) -> str | None:
    """Why ``recipe`` cannot be streamed, or None when it can."""
    if recipe.scheme in QDQ_SCHEMES:
        return f"{recipe.scheme.value} is calibrated static QDQ (needs activations of the whole graph)"
    if recipe.scheme is QuantScheme.int8 and recipe.int8_format is Int8Format.qoperator:
        return "int8 qoperator goes through onnxruntime's quantize_dynamic (whole model)"
    if recipe.scheme is QuantScheme.int4 and recipe.int4_algorithm not in STREAMED_ALGORITHMS:
        return (f"int4 algorithm {recipe.int4_algorithm.value} needs calibration activations or "
                "the whole model")
    if recipe.lm_head_int8_tokens:
        return "the split lm_head (lm_head_int8_tokens) needs calibration text"
    return None


def check_streamable(recipe: QuantRecipe) -> None:
    reason = streaming_unsupported(recipe)
    if reason:
        raise UnsupportedOp(
            f"the streaming quantizer does not do recipe {recipe.label()}: {reason}. It streams "
            "int4 (rtn symmetric or asymmetric, hqq; --block-size, --mlp-block-size, "
            "--accuracy-level), int8 nbits, --lm-head float/int8/int4, --keep-layers and "
            "--embedding float/int8/int4; other recipes load the whole model (quantize_model)"
        )


def prepare(model: onnx.ModelProto, lazy: LazyWeights, recipe: QuantRecipe, say: Say) -> GraphFacts:
    """Today's graph preparation (core.quantize_model), on placeholders; returns the facts."""
    gemms = split_gemms(model, lazy)
    if gemms:
        say(f"{gemms} Gemm -> MatMul + Add (the weight-only quantizer takes MatMul)")
    folded = fold_weight_transposes(model, lazy)
    if folded:
        say(f"{folded} MatMul weights behind a Transpose folded (tied lm_head)")
    if recipe.scheme is QuantScheme.int4 or (
        recipe.scheme is QuantScheme.int8 and recipe.int8_format is Int8Format.nbits
    ):
        packed = pack_shared_input_matmuls(model, lazy)
        if packed:
            say(f"{len(packed)} MatMul groups reading one input packed into one MatMul + Split "
                "(gate/up: one activation quantization per layer)")
    return analyze(model)


def plan(facts: GraphFacts, recipe: QuantRecipe) -> tuple[dict[str, tuple], dict[str, str]]:
    """``node -> (bits, block_size, symmetric, algorithm)`` and ``node -> precision`` as
    :func:`weight_only.quantize_weight_only` decides them."""
    bits = 4 if recipe.scheme is QuantScheme.int4 else 8
    keep = set(recipe.keep_layers)
    head = facts.lm_head
    body = {w.node for w in facts.body_matmuls() if w.layer not in keep}
    kept = {w.node for w in facts.body_matmuls() if w.layer in keep}
    first = set(body)
    if head and recipe.lm_head_precision.value == f"int{bits}":
        first.add(head)
    algorithm = recipe.int4_algorithm if bits == 4 else Int4Algorithm.rtn
    mlp = set()
    if bits == 4 and recipe.mlp_block_size and recipe.mlp_block_size != recipe.block_size:
        mlp = {w.node for w in facts.weight_matmuls if w.mlp_input and w.node in first}
    by_node = {w.node: w for w in facts.weight_matmuls}
    todo: dict[str, tuple] = {}
    for n in first:
        if n in mlp:
            block = recipe.mlp_block_size
        elif bits == 8:  # the int8 scheme's block per kind (QuantRecipe.block_sizes)
            block = recipe.block_for(by_node[n].kinds, lm_head=n == head)
        else:
            block = recipe.block_size
        todo[n] = (bits, block, recipe.symmetric, algorithm)
    second = set(kept) if bits == 4 else set()
    if head and recipe.lm_head_precision is TensorPrecision.int8 and head not in first:
        second.add(head)
    for n in second:
        todo[n] = (8, recipe.int8_block_size or recipe.block_size, recipe.symmetric,
                   Int4Algorithm.rtn)
    precision = {n: f"int{spec[0]}" for n, spec in todo.items()}
    for w in facts.weight_matmuls:
        precision.setdefault(w.node, "float")
    return todo, precision


class _Writer:
    """Where new initializers go: small ones inline, the rest appended to the data file."""

    def __init__(self, data: DataFileWriter):
        self.data = data

    def store(self, name: str, array: np.ndarray) -> TensorProto:
        if array.nbytes < INLINE_BELOW:
            return numpy_helper.from_array(np.ascontiguousarray(array), name)
        return self.data.add_array(name, array)

    def store_proto(self, tensor: TensorProto) -> TensorProto:
        if is_external(tensor) or tensor_nbytes(tensor) >= INLINE_BELOW:
            return self.data.add_proto(tensor)
        return tensor


def _nbits_rtn(node: onnx.NodeProto, w: np.ndarray, spec: tuple, level: int,
               out: _Writer) -> tuple[onnx.NodeProto, list[TensorProto]]:
    """One MatMul -> MatMulNBits exactly as ``DefaultWeightOnlyQuantizer.quantize_matmul``
    writes it (QOperator format): same kernel, tensor names, attributes."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq
    from onnxruntime.quantization.quant_utils import QuantFormat

    bits, block, symmetric, _ = spec
    config = mnq.DefaultWeightOnlyQuantConfig(
        block_size=block, is_symmetric=symmetric, accuracy_level=level or None,
        quant_format=QuantFormat.QOperator, op_types_to_quantize=("MatMul",), bits=bits)
    quantizer = mnq.DefaultWeightOnlyQuantizer(config)
    name = node.input[1]
    k, n = w.shape
    step = max(1, CHUNK_VALUES // k)
    if step >= n:
        packed, scales, zero_points = quantizer.qbits_block_quant(np.ascontiguousarray(w))
        tensors = [out.store(name + f"_Q{bits}", packed)]
    else:  # packed rows straight to the file; scales and zero points (small) after them
        offset, scale_parts, zp_parts = None, [], []
        for start in range(0, n, step):
            packed, part_scales, part_zp = quantizer.qbits_block_quant(
                np.ascontiguousarray(w[:, start:start + step]))
            if offset is None:
                offset = out.data.begin(n * packed.shape[1] * packed.shape[2])
            out.data.append(packed)
            scale_parts.append(part_scales)
            zp_parts.append(part_zp)
        tensors = [out.data.end(name + f"_Q{bits}", TensorProto.UINT8,
                                [n, packed.shape[1], packed.shape[2]], offset)]
        scales, zero_points = np.concatenate(scale_parts), np.concatenate(zp_parts)
    tensors.append(out.store(name + "_scales", scales))
    if not symmetric:
        tensors.append(out.store(name + "_zero_points", zero_points))
    attrs = {"K": w.shape[0], "N": w.shape[1], "bits": bits, "block_size": block}
    if level:
        attrs["accuracy_level"] = level
    new = helper.make_node("MatMulNBits", [node.input[0], *(t.name for t in tensors)],
                           [node.output[0]], name=node.name + f"_Q{bits}" if node.name else "",
                           domain="com.microsoft", **attrs)
    return new, tensors


def _nbits_exact(node: onnx.NodeProto, blocks: NBitsBlocks, dtype, level: int,
                 out: _Writer) -> tuple[onnx.NodeProto, list[TensorProto]]:
    """One MatMul -> MatMulNBits with a source's own blocks (no quantization), laid out and
    named as ``_nbits_rtn`` lays out its own."""
    name, bits = node.input[1], blocks.bits
    tensors = [out.store(name + f"_Q{bits}", blocks.packed)]
    if blocks.zero_points is not None and blocks.zero_points.dtype.kind == "f":
        # float zero points (Q4_K): scales and zero points inline for fold_float_zero_points,
        # as _nbits_hqq leaves its own
        tensors += [numpy_helper.from_array(blocks.scales.astype(dtype), name + "_scales"),
                    numpy_helper.from_array(blocks.zero_points.astype(dtype),
                                            name + "_zero_points")]
    else:
        tensors.append(out.store(name + "_scales", blocks.scales.astype(dtype)))
        if blocks.zero_points is not None:
            tensors.append(out.store(name + "_zero_points", blocks.zero_points))
    new = helper.make_node("MatMulNBits", [node.input[0], *(t.name for t in tensors)],
                           [node.output[0]], name=node.name + f"_Q{bits}" if node.name else "",
                           domain="com.microsoft", **blocks.attributes(level))
    return new, tensors


def _exact_for(node, lazy: LazyWeights, exact: ExactBlocks | None, spec: tuple,
               k: int, n: int, widen: bool = False
               ) -> tuple[NBitsBlocks | None, list[str], str | None]:
    """``(blocks, names, why_not)``: the source's blocks for ``node``'s weight when they
    fit the recipe's bits and block size (packed weights: every part's blocks, side by side);
    else None and, when the source holds quantized blocks for it, why they were not kept.
    ``names``: the source's tensor names of the parts (their modules where it has none).
    ``widen`` (QuantRecipe.keep_source_bits): blocks of more bits than ``spec`` asks are kept
    too, at their own bits and block size, when every part has the same ones."""
    if exact is None:
        return None, [], None
    modules = lazy.parts.get(node.input[1]) or [_module_and_layer(node)[0]]
    found = [exact(module) for module in modules]
    if all(b is None for b in found) and _packed_qkv_modules(node):
        # the GQA fusion's packed QKV: the source has blocks of each projection, not of this
        modules = _packed_qkv_modules(node)
        found = [exact(module) for module in modules]
    modules = [b.source_name if isinstance(b, NBitsBlocks) and b.source_name else m
               for m, b in zip(modules, found, strict=True)]
    if all(b is None for b in found):
        return None, modules, None
    reasons = [b for b in found if isinstance(b, str)]
    if reasons:
        return None, modules, reasons[0]
    if any(b is None for b in found):
        return None, modules, "only some parts of the packed weight have quantized blocks"
    own = {(b.bits, b.block_size) for b in found}
    if widen and len(own) == 1 and found[0].bits > spec[0]:
        spec = (*own.pop(), *spec[2:])  # never fewer bits than the file holds
    for b in found:
        if (b.bits, b.block_size) != spec[:2]:
            return None, modules, (
                f"the file's {b.source_type} blocks are {b.bits}-bit, block {b.block_size}; the "
                f"recipe asks {spec[0]}-bit, block {spec[1]} here: quantized again")
        if b.k != k:
            return None, modules, f"the file's blocks have K={b.k}, the graph's weight K={k}"
    blocks = found[0] if len(found) == 1 else concat_blocks(found)
    if blocks.n != n:
        return None, modules, f"the file's blocks have N={blocks.n}, the graph's weight N={n}"
    return blocks, modules, None


def _packed_qkv_modules(node: onnx.NodeProto) -> list[str]:
    """The modules whose weights the GQA fusion packed into ``node`` (its Q, K, V MatMuls'
    name scopes, recorded on the node: passes/attention_gqa.py), or []."""
    import ast

    from ..passes.attention_gqa import PACKED_SCOPES

    value = next((p.value for p in node.metadata_props if p.key == PACKED_SCOPES), None)
    if value is None:
        return []
    try:
        parts = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return []
    return [str(p[-2]) if isinstance(p, list) and len(p) >= 2 else "" for p in parts]


def _nbits_hqq(node: onnx.NodeProto, w: np.ndarray, spec: tuple, level: int,
               out: _Writer) -> tuple[onnx.NodeProto, list[TensorProto]]:
    """HQQ with ONNX Runtime's numbers (hqq.py: the same bytes as its
    ``HQQWeightOnlyQuantizer``, several times faster), the node named and laid out as that
    quantizer writes it. The packed weights go to the data file; scales and float zero
    points stay inline for ``fold_float_zero_points`` (1/16 of the fp32 weights at block 32)."""
    bits, block, _, _ = spec
    if w.shape[0] % block or w.shape[0] == block:  # not hqq.py's (its ValueError): ORT's code
        return _nbits_hqq_ort(node, w, spec, level, out)
    packed, scales, zero_points = hqq_quantize(w, bits, block)
    name = node.input[1]
    tensors = [out.store(name + f"_Q{bits}", packed),
               numpy_helper.from_array(scales, name + "_scales"),
               numpy_helper.from_array(zero_points, name + "_zero_points")]
    new = helper.make_node("MatMulNBits", [node.input[0], *(t.name for t in tensors)],
                           [node.output[0]], name=node.name + f"_Q{bits}" if node.name else "",
                           domain="com.microsoft", K=w.shape[0], N=w.shape[1], bits=bits,
                           block_size=block)
    if level:
        new.attribute.append(helper.make_attribute("accuracy_level", level))
    return new, tensors


def _nbits_hqq_ort(node: onnx.NodeProto, w: np.ndarray, spec: tuple, level: int,
                   out: _Writer) -> tuple[onnx.NodeProto, list[TensorProto]]:
    """HQQ through ONNX Runtime's own node quantizer on a one-tensor graph."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    bits, block, _, _ = spec
    config = mnq.HQQWeightOnlyQuantConfig(block_size=block, bits=bits, op_types_to_quantize=("MatMul",))
    mini = onnx.GraphProto(initializer=[numpy_helper.from_array(w, node.input[1])])
    del w
    nodes = mnq.HQQWeightOnlyQuantizer(config).quantize(node, [mini])
    if len(nodes) != 1 or nodes[0].op_type != "MatMulNBits":
        raise UnsupportedOp(f"{node.name}: HQQ returned {[n.op_type for n in nodes]}, expected "
                            "one MatMulNBits")
    new = nodes[0]
    if level and not any(a.name == "accuracy_level" for a in new.attribute):
        new.attribute.append(helper.make_attribute("accuracy_level", level))
    made = {t.name: t for t in mini.initializer if t.name != node.input[1]}
    tensors = [out.store_proto(made[new.input[1]])]
    tensors += [made[n] for n in new.input[2:] if n]  # scales, zero points: inline for now
    return new, tensors


def _quantize_matmuls(model, lazy: LazyWeights, todo: dict[str, tuple],
                      level_for: Callable[[int], int], out: _Writer, say: Say,
                      exact: ExactBlocks | None = None, kept_exact: list[str] | None = None,
                      record: "ExactRecord | None" = None,
                      widen: set[str] | frozenset = frozenset(),
                      wide_block: int | None = None) -> int:
    graph = model.graph
    nodes = list(graph.node)
    kept_exact = kept_exact if kept_exact is not None else []
    record = record if record is not None else ExactRecord()
    new_nodes, count, total = [], 0, len(todo)
    last_layer = None
    t0 = time.perf_counter()
    for node in nodes:
        spec = todo.get(node.name) if node.op_type == "MatMul" else None
        if spec is None or node.input[1] not in lazy.protos:
            new_nodes.append(node)
            continue
        shape = [int(d) for d in lazy.protos[node.input[1]].dims]
        blocks, modules, why_not = (_exact_for(node, lazy, exact, spec, *shape,
                                               widen=node.name in widen)
                                    if len(shape) == 2 else (None, [], None))
        if why_not is not None:
            record.requantized.update({m: why_not for m in modules})
        if (blocks is not None and wide_block and blocks.bits > spec[0]
                and blocks.block_size != wide_block):
            # the source's wider blocks at 8 bits on a coarser grid (QuantRecipe.int8_block_size)
            spec = (8, wide_block, True, Int4Algorithm.rtn)
            record.widened[node.name] = "int8"
            record.requantized.update({m: f"8-bit blocks of {blocks.block_size} rounded again at "
                                       f"8 bits, block {wide_block} (QuantRecipe.int8_block_size)"
                                       for m in modules})
            blocks = None
        if blocks is not None:
            types = blocks.part_types or (blocks.source_type,) * len(modules)
            record.kept.update(dict(zip(modules, types, strict=True)))  # Gemma's QKV: Q5_0 + Q8_0
            dtype = helper.tensor_dtype_to_np_dtype(lazy.protos[node.input[1]].data_type)
            new, tensors = _nbits_exact(node, blocks, dtype, level_for(blocks.bits), out)
            graph.initializer.extend(tensors)
            new_nodes.append(new)
            count += 1
            kept_exact.append(node.name)
            if blocks.bits != spec[0]:
                record.widened[node.name] = f"int{blocks.bits}"
            continue
        w = lazy.array(node.input[1])
        if w.ndim != 2:
            new_nodes.append(node)
            continue
        if w.dtype not in (np.float32, np.float16):
            raise UnsupportedOp(f"{node.name}: weight {node.input[1]} is {w.dtype}; the streaming "
                                "quantizer takes fp32 or fp16 weights")
        quantize = _nbits_hqq if spec[3] is Int4Algorithm.hqq else _nbits_rtn
        new, tensors = quantize(node, w, spec, level_for(spec[0]), out)
        del w
        graph.initializer.extend(tensors)
        new_nodes.append(new)
        count += 1
        layer = _layer_of(node.name)
        if layer is not None and layer != last_layer:
            spent = time.perf_counter() - t0
            eta = f", ~{spent / count * (total - count):.0f} s left" if count > 1 else ""
            say(f"layer {layer}: {count}/{total} tensors quantized{eta}")
            last_layer = layer
    del graph.node[:]
    graph.node.extend(new_nodes)
    return count


def _layer_of(name: str) -> int | None:
    import re

    m = re.search(r"(?:layers|h|blocks)\.(\d+)", name)
    return int(m.group(1)) if m else None


def _embedding_int8(model, lazy: LazyWeights, gathers: list[str], block: int,
                    out: _Writer) -> list[str]:
    """:func:`weight_only.embedding_int8` a block of rows at a time (it is row-wise)."""
    graph = model.graph
    done = []
    for idx, node in enumerate(list(graph.node)):
        if node.name not in gathers or node.op_type != "Gather" or node.input[0] not in lazy.protos:
            continue
        table = lazy.protos[node.input[0]]
        if len(table.dims) != 2:
            continue
        vocab, k = (int(d) for d in table.dims)
        full = lazy.array(node.input[0]) if not is_external(table) else None
        q_ref, offset, scales, gbq = None, None, [], None
        for start in range(0, vocab, EMBEDDING_ROWS):
            rows = (full[start:start + EMBEDDING_ROWS] if full is not None
                    else _read_rows(lazy, table, start, min(vocab, start + EMBEDDING_ROWS)))
            mini = onnx.ModelProto(graph=onnx.GraphProto(
                node=[node], initializer=[numpy_helper.from_array(np.ascontiguousarray(rows),
                                                                  node.input[0])]))
            del rows
            if not embedding_int8(mini, [node.name], block):
                break  # not a table embedding_int8 takes (axis, block): the lookup stays float
            made = {t.name: t for t in mini.graph.initializer}
            gbq = mini.graph.node[0]
            q = numpy_helper.to_array(made[gbq.input[0]])
            scales.append(numpy_helper.to_array(made[gbq.input[2]]))
            if offset is None:
                offset = out.data.begin(vocab * k)
            out.data.append(q)
        if gbq is None:
            continue
        q_ref = out.data.end(gbq.input[0], TensorProto.UINT8, [vocab, k], offset)
        graph.initializer.extend([q_ref, out.store(gbq.input[2], np.concatenate(scales))])
        graph.node.remove(graph.node[idx])
        graph.node.insert(idx, gbq)
        if not any(node.input[0] in n.input for n in graph.node):
            graph.initializer.remove(next(t for t in graph.initializer if t.name == node.input[0]))
        done.append(node.name)
    if done and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return done


def _read_rows(lazy: LazyWeights, table: TensorProto, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of an external 2-D table (a positioned read of just them, or the
    unwritten table's rows: ``TensorSource.rows``)."""
    return lazy.source.rows(table, start, stop)


def _large_gathers(model, gathers: list[str]) -> list[str]:
    """The embedding lookups whose 2-D table holds at least ``TIED_TABLE_MIN_VALUES``."""
    inits = {t.name: t for t in model.graph.initializer}
    found = []
    for node in model.graph.node:
        table = inits.get(node.input[0]) if node.name in gathers else None
        if (table is not None and len(table.dims) == 2
                and int(np.prod(table.dims)) >= tied_table.TIED_TABLE_MIN_VALUES):
            found.append(node.name)
    return found


def _large_table_width(model, facts: GraphFacts) -> int | None:
    """The row width of the first large embedding table (``_large_gathers``), or None."""
    large = _large_gathers(model, facts.embedding_gathers)
    tables = {n.input[0] for n in model.graph.node if n.name in large}
    return next((int(t.dims[1]) for t in model.graph.initializer if t.name in tables), None)


def _transposed_equal(lazy: LazyWeights, table: str, weight: str) -> bool:
    """Whether the ``[V, K]`` ``table`` equals the ``[K, V]`` ``weight`` transposed: the
    tied ``lm_head``'s ``W.T`` placeholder of it, or a copy compared a block of rows at a time
    (the weight's columns read through a memory map, not the whole weight)."""
    if lazy.is_placeholder(weight):
        if weight == table + "_T":
            return True
        w = lazy.array(weight)
    else:
        t = lazy.protos[weight]
        if is_external(t):
            w = lazy.source.matrix(t)
        else:
            w = lazy.array(weight)
    proto = lazy.protos[table]
    vocab = int(proto.dims[0])
    full = None if is_external(proto) else lazy.array(table)
    for start in range(0, vocab, EMBEDDING_ROWS):
        stop = min(vocab, start + EMBEDDING_ROWS)
        rows = full[start:stop] if full is not None else _read_rows(lazy, proto, start, stop)
        if not np.array_equal(rows, np.asarray(w[:, start:stop]).T):
            return False
    return True


def _embedding_int4(model, lazy: LazyWeights, gathers: list[str], recipe: QuantRecipe) -> list[str]:
    """ONNX Runtime's ``quantize_gather`` on each table (as ``weight_only._quantize_embedding``
    runs it), with the graph-level settings its ``process`` makes."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    config = mnq.DefaultWeightOnlyQuantConfig(
        block_size=recipe.block_size, is_symmetric=recipe.symmetric,
        op_types_to_quantize=("Gather",), quant_axes=(("Gather", 1),), bits=4)
    quantizer = mnq.DefaultWeightOnlyQuantizer(config)
    graph = model.graph
    done = []
    for idx, node in enumerate(list(graph.node)):
        if node.name not in gathers or node.op_type != "Gather" or node.input[0] not in lazy.protos:
            continue
        mini = onnx.GraphProto(initializer=[numpy_helper.from_array(lazy.array(node.input[0]),
                                                                    node.input[0])])
        new = quantizer.quantize(node, [mini])
        graph.node.remove(graph.node[idx])
        for j, n in enumerate(new):
            graph.node.insert(idx + j, n)
        graph.initializer.extend(t for t in mini.initializer if t.name != node.input[0])
        done.append(node.name)
    _set_opset(model, "com.microsoft", 1)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < 21:
            opset.version = 21
    if model.ir_version < 10:
        model.ir_version = 10
    return done


def _set_opset(model, domain: str, version: int) -> None:
    for opset in model.opset_import:
        if opset.domain == domain:
            opset.version = version
            return
    model.opset_import.append(helper.make_opsetid(domain, version))


def _share_tied_table(model, data_path: Path) -> list[str]:
    """``share_tied_int4_table`` with the int4 MatMulNBits weights it may compare brought
    inline from the data file (only those shaped like an int4 lookup table)."""
    graph = model.graph
    tables = {}
    for node in graph.node:
        if node.op_type == "GatherBlockQuantized":
            data = next((t for t in graph.initializer if t.name == node.input[0]), None)
            if data is not None and data.data_type == TensorProto.INT4 and len(data.dims) == 2:
                tables[(int(data.dims[0]), int(data.dims[1]))] = node
    if not tables:
        return []
    reader = TensorSource(data_path.parent)
    inlined = {}
    for node in graph.node:
        if node.op_type != "MatMulNBits":
            continue
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        if a.get("bits") != 4 or (a.get("N"), a.get("K")) not in tables:
            continue
        for t in graph.initializer:
            if t.name in node.input[1:3] and is_external(t):
                inlined[t.name] = TensorProto()
                inlined[t.name].CopyFrom(t)
                arr = reader.read(t)
                t.ClearField("external_data")
                t.data_location = TensorProto.DEFAULT
                t.raw_data = arr.tobytes()
    shared = share_tied_int4_table(model)
    for t in graph.initializer:  # put the references back: the bytes are in the file already
        if t.name in inlined:
            t.CopyFrom(inlined[t.name])
    return shared


def _finish(model, lazy: LazyWeights, out: _Writer, say: Say) -> None:
    """Every initializer still inline above the threshold, still a placeholder or still in the
    source's data file goes to the output's data file, in graph order."""
    graph = model.graph
    finished = []
    for t in graph.initializer:
        if lazy.is_placeholder(t.name) and not t.HasField("raw_data") and not is_external(t):
            finished.append(out.store(t.name, lazy.array(t.name)))
        elif is_external(t) and t.name not in out.data.names:
            finished.append(out.data.add_proto(t, lazy.source))
        elif not is_external(t) and tensor_nbytes(t) >= INLINE_BELOW:
            finished.append(out.data.add_proto(t))
        else:
            finished.append(t)
    del graph.initializer[:]
    graph.initializer.extend(finished)


@dataclass
class ExactRecord:
    """Which of the source's quantized tensors (by its tensor name; the graph's module path
    where the source gave a reason instead of blocks) kept their own blocks, and which were
    quantized again and why."""

    kept: dict[str, str] = field(default_factory=dict)  # tensor -> source type ("Q4_0")
    requantized: dict[str, str] = field(default_factory=dict)  # tensor (or module) -> reason
    #: node -> its precision, where the source's wider blocks were kept (keep_source_bits)
    widened: dict[str, str] = field(default_factory=dict)

    def to_dict(self, nodes: list[str]) -> dict:
        """The manifest's ``quantization.gguf_exact``: counts, names and reasons."""
        reasons = Counter(self.requantized.values())
        return {
            "tensors": len(self.kept),
            "by_type": dict(Counter(self.kept.values())),
            "names": sorted(self.kept),
            "nodes": sorted(nodes),
            "requantized": {"tensors": len(self.requantized), "names": sorted(self.requantized),
                            "reasons": dict(reasons)},
            # MatMuls above the recipe's bits because the file holds more (keep_source_bits)
            "wider_than_recipe": dict(Counter(self.widened.values())),
        }


@dataclass
class StreamedReport(QuantReport):
    """:class:`core.QuantReport` plus the MatMuls whose weights are the source's own blocks."""

    exact_blocks: list[str] = field(default_factory=list)  # node names, no requantization
    #: with a source of blocks (``exact``): the manifest's ``gguf_exact`` (ExactRecord.to_dict)
    gguf_exact: dict | None = None
    #: a large tied table split by token frequency (QuantRecipe.large_table_int8_tokens): its
    #: rows per precision, how the 4-bit rows were rounded and from what
    large_table_split: dict | None = None

    def to_dict(self) -> dict:
        d = super().to_dict()
        del d["exact_blocks"]  # the node names are in gguf_exact
        for key in ("gguf_exact", "large_table_split"):
            if d[key] is None:
                del d[key]
        return d


def quantize_file_streaming(src: str | Path | None, dst: str | Path, recipe: QuantRecipe, *,
                            progress: Say | None = None,
                            exact: ExactBlocks | None = None,
                            graph: tuple[onnx.ModelProto, TensorSource] | None = None,
                            tokenizer_dir: str | Path | None = None
                            ) -> StreamedReport:
    """Quantize the decoder graph ``src`` into ``dst`` + ``<dst>.data`` (external data,
    any size), one weight in memory at a time. Raises :class:`UnsupportedOp` for the
    recipes listed in :func:`streaming_unsupported`.

    ``exact(module)``: for a weight whose HF module (``graph.analyze``'s
    ``WeightMatMul.module``; a packed gate/up asks for each of its parts) has quantized blocks
    in the source, return them (gguf_blocks.py); when their shape, bits and block size are
    the recipe's for that node they are written as they are, not quantized again (the
    report's ``exact_blocks`` lists those nodes).

    ``graph``: instead of the file ``src`` (then None), a graph that was never written and
    the source of its weights (quantize on write: ``graph_writer.graph_without_weights``,
    the weights read from the export's checkpoint one at a time). The graph is not modified
    (a copy is quantized).

    ``tokenizer_dir``: where the calibration text's tokenizer is (a split tied table,
    ``large_table_int8_tokens``); default: ``src``'s directory."""
    say = progress or (lambda _m: None)
    check_streamable(recipe)
    dst = Path(dst)
    t0 = time.perf_counter()
    quiet_ort_logging()
    if graph is not None:
        # A copy the quantizer alone holds: with the upb protobuf backend a message's memory
        # is one arena freed only with the whole message, so every tensor the quantizer sets
        # and then moves to the data file (packed weights, the tied table, the zero-point
        # corrections) stays allocated while anything holds the message. The caller's graph
        # lived through the quality card: the 3B Llama's held 3.9 GB of heap under the
        # candidate's ONNX Runtime session (issue 15); this copy goes when we return.
        model, source = onnx.ModelProto(), graph[1]
        model.CopyFrom(graph[0])
    else:
        src = Path(src)
        model = load_graph(src)  # large inline weights become references into src itself
        source = TensorSource(src.parent)
        tokenizer_dir = src.parent if tokenizer_dir is None else tokenizer_dir
    lazy = LazyWeights(model, source)
    facts = prepare(model, lazy, recipe, say)
    todo, precision = plan(facts, recipe)
    wide_block = recipe.int8_block_for(_large_table_width(model, facts) if exact else None)
    if wide_block:  # the 8-bit MatMuls (lm_head, kept layers) on the same coarser grid
        todo.update({n: (8, wide_block, *s[2:]) for n, s in todo.items() if s[0] == 8})
    tied, large = [], []
    if recipe.large_table and recipe.embedding is TensorPrecision.float:
        if todo.get(facts.lm_head, (None,))[0] == 8:
            tied = tied_gathers(model, facts.embedding_gathers, facts.lm_head,
                                lambda table, weight: _transposed_equal(lazy, table, weight))
        large = [g for g in _large_gathers(model, facts.embedding_gathers) if g not in tied]
        if tied and recipe.tied_head_int4:
            # the shared table at 4 bits: RTN's integer zero points (HQQ's float ones are
            # folded into a correction the lookup cannot read)
            todo[facts.lm_head] = (4, recipe.block_size, recipe.symmetric, Int4Algorithm.rtn)
            precision[facts.lm_head] = "int4"
    split_plan = None
    if tied and recipe.tied_head_int4 and recipe.large_table_int8_tokens:
        # the head stays a float MatMul through the body's pass; split after it
        split_plan = plan_split(model, facts.lm_head, lazy, recipe,
                                 None if graph is not None else src,
                                 Path(tokenizer_dir) if tokenizer_dir else None, say)
        del todo[facts.lm_head]
        precision[facts.lm_head] = "int4+int8"
    head_output = next((n.output[0] for n in model.graph.node if n.name == facts.lm_head), None)
    data_path = dst.with_name(dst.name + ".data")
    with DataFileWriter(data_path) as data:
        out = _Writer(data)
        bits = 4 if recipe.scheme is QuantScheme.int4 else 8
        say(f"{sum(1 for s in todo.values() if s[0] == bits)} MatMuls -> MatMulNBits {bits}-bit, "
            f"{sum(1 for s in todo.values() if s[0] != bits)} -> 8-bit (lm_head / kept layers), "
            "streamed one tensor at a time")
        kept_exact: list[str] = []
        record = ExactRecord()
        phase = time.perf_counter()
        # an lm_head precision the user named is theirs: only the recipe's defaults widen
        widen = (set(todo) - ({facts.lm_head} if recipe.lm_head is not None else set())
                 if recipe.keep_source_bits and bits == 4 else set())
        if widen and exact is not None:  # wider blocks kept for some kinds only
            exact = narrow_wider_blocks(exact, recipe.keep_source_bits_kinds, bits)
        count = _quantize_matmuls(model, lazy, todo, recipe.level_for, out, say, exact,
                                  kept_exact, record, widen=widen, wide_block=wide_block)
        phase = _phase(say, f"{count} MatMuls quantized", phase)
        if record.widened:
            precision.update(record.widened)
            say(f"{len(record.widened)} MatMuls keep the source's blocks of more than "
                f"{bits} bits as they are: never fewer bits than the file "
                "(QuantRecipe.keep_source_bits)")
        if kept_exact:
            say(f"{len(kept_exact)} MatMuls keep the source's own quantized blocks (no "
                "requantization)")
        for reason, n in Counter(record.requantized.values()).items():
            say(f"{n} source tensors not kept as they are: {reason}")
        if count:
            _set_opset(model, "com.microsoft", 1)
            drop_unused_initializers(model)
        gathers = facts.embedding_gathers
        split_record = None
        if split_plan is not None:
            split_record = split_streamed(model, lazy, facts.lm_head, tied[0], split_plan,
                                          recipe, wide_block, say)
            precision.update({g: "int4+int8" for g in tied[:1]})
            phase = _phase(say, "tied table split", phase)
        shared = [g for g in (tied if split_plan is None else [])
                  if share_tied_nbits_table(model, g, head_output)]
        tied_bits = precision.get(facts.lm_head, "int8")
        if shared:
            drop_unused_initializers(model)
            precision.update({g: tied_bits for g in shared})
            say(f"embedding lookup reads the tied lm_head's {tied_bits} table (stored once: "
                "the table is large; QuantRecipe.large_table)")
        large_done = []
        if large:
            say(f"embedding -> GatherBlockQuantized int8 (block {recipe.block_size}): the table is "
                "large (QuantRecipe.large_table)")
            large_done = _embedding_int8(model, lazy, large, recipe.block_size, out)
            precision.update({g: "int8" for g in large_done})
        if recipe.embedding is TensorPrecision.int4 and gathers:
            say(f"embedding -> GatherBlockQuantized int4 (block {recipe.block_size})")
            done = _embedding_int4(model, lazy, gathers, recipe)
            drop_unused_initializers(model)
            precision.update({g: "int4" for g in done})
            data.flush()
            if _share_tied_table(model, data_path):
                say("embedding lookup reads the tied lm_head's int4 table (stored once)")
        elif recipe.embedding is TensorPrecision.int8 and gathers:
            say(f"embedding -> GatherBlockQuantized int8 (block {recipe.block_size})")
            done = _embedding_int8(model, lazy, gathers, recipe.block_size, out)
            precision.update({g: "int8" for g in done})
        phase = _phase(say, "embedding / tied table", phase)
        # a source's own blocks (Q4_K) keep fp32 M: the file's values to fp32 rounding
        fold = fold_and_say(model, recipe.zero_point_storage.code_bits, say,
                            keep_exact={f"{n}_Q4" for n in kept_exact})
        phase = _phase(say, "zero points folded", phase)
        _finish(model, lazy, out, say)
    onnx.save_model(model, str(dst))
    _phase(say, "float tensors copied, graph written", phase)
    contrib = sorted({f"{n.domain}.{n.op_type}" for n in model.graph.node
                      if n.domain not in ("", "ai.onnx")})
    return StreamedReport(
        exact_blocks=kept_exact,
        gguf_exact=record.to_dict(kept_exact) if exact is not None else None,
        large_table_split=split_record,
        recipe=recipe.model_dump(mode="json"),
        label=recipe.label(),
        weight_precision=dict(Counter(precision.get(w.node, "float") for w in facts.weight_matmuls)),
        embedding=(f"{tied_bits}-tied" if shared or split_record else "int8" if large_done
                   else recipe.embedding.value)
        if facts.embedding_gathers else "none",
        lm_head=precision.get(facts.lm_head, "none") if facts.lm_head else "none",
        op_decisions=weight_only_table(model),
        contrib_ops=contrib,
        calibration=None,
        seconds=round(time.perf_counter() - t0, 2),
        ort_tools=["onnxruntime.quantization.matmul_nbits_quantizer (per tensor, streamed)"],
        zero_points=fold.label,
        zero_point_error=round(fold.max_zero_point_error, 4) if fold.compact else None,
        accuracy_levels=nbits_levels(model),
    )


def _phase(say: Say, what: str, since: float) -> float:
    """Report a phase's wall time (the progress line); returns now."""
    now = time.perf_counter()
    say(f"{what} in {now - since:.1f} s")
    return now
