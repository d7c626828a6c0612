"""Weight-only quantization to ``MatMulNBits`` (4 or 8 bits) with ONNX Runtime's quantizer.

Each group of nodes that needs a different setting (the body, the ``lm_head``, layers
kept at a higher precision, the embedding) is one pass of
``onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer`` with every
other MatMul excluded. The quantizer's own numerics are used as they are.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from .gptq import rewrite_matmul_nbits
from .graph import GraphFacts
from .head_split import group_size, split_lm_head
from .recipe import Int4Algorithm, QuantRecipe, TensorPrecision
from .tied_table import share_tied_int4_table

Say = Callable[[str], None]
#: gptq-act's calibration, one of: ``hessians({activation: K}) -> {activation: E[x^T x]}``
#: on the float graph (gptq.collect_hessians: every Hessian at once), or an object with
#: ``layered(model, {node: block size}) -> {MatMul output: (j, scale, zero)}`` (one layer
#: at a time through the quantized prefix: gptq_layered.py)
Hessians = Callable[[dict[str, int]], dict[str, np.ndarray]]


def _quiet_ort_quantizer() -> None:
    # matmul_nbits_quantizer logs one INFO line per node through logging.basicConfig; keep
    # stderr readable (our progress callback reports what matters).
    for name in ("onnxruntime.quantization.matmul_nbits_quantizer",
                 "onnxruntime.quantization.neural_compressor.weight_only"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _matmul_names(model: onnx.ModelProto) -> set[str]:
    return {n.name for n in model.graph.node if n.op_type == "MatMul"}


def _run_nbits(
    model: onnx.ModelProto,
    targets: set[str],
    *,
    bits: int,
    block_size: int,
    symmetric: bool,
    accuracy_level: int,
    algorithm: Int4Algorithm = Int4Algorithm.rtn,
    calibration_reader=None,
) -> onnx.ModelProto:
    """Quantize exactly the MatMul nodes in ``targets``; return the new model."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq
    from onnxruntime.quantization.quant_utils import QuantFormat

    if not targets:
        return model
    exclude = sorted(_matmul_names(model) - targets)
    level = accuracy_level or None
    if algorithm is Int4Algorithm.rtn or bits == 8:
        algo = mnq.DefaultWeightOnlyQuantConfig(
            block_size=block_size, is_symmetric=symmetric, accuracy_level=level,
            quant_format=QuantFormat.QOperator, op_types_to_quantize=("MatMul",), bits=bits,
        )
    elif algorithm is Int4Algorithm.hqq:
        algo = mnq.HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits,
                                            op_types_to_quantize=("MatMul",))
    elif algorithm is Int4Algorithm.k_quant:
        algo = mnq.KQuantWeightOnlyQuantConfig(op_types_to_quantize=("MatMul",))
    else:  # gptq
        algo = mnq.GPTQWeightOnlyQuantConfig(
            calibration_data_reader=calibration_reader, block_size=block_size,
            op_types_to_quantize=("MatMul",),
        )
    hidden = _hide_weights(model, exclude) if algorithm is Int4Algorithm.gptq else {}
    # The quantizer's topological sort (k_quant, rtn via neural_compressor) fails on a graph
    # input nothing reads: fused graphs keep position_ids for the runtime's contract though
    # GroupQueryAttention derives positions itself. Such inputs sit out the quantizer.
    read = {i for n in model.graph.node for i in n.input}
    order = [i.name for i in model.graph.input]
    idle = [i for i in model.graph.input if i.name not in read]
    for value in idle:
        model.graph.input.remove(value)
    before = {n.name for n in model.graph.node if n.op_type == "MatMulNBits"}
    quantizer = mnq.MatMulNBitsQuantizer(
        model, bits=bits, block_size=block_size, is_symmetric=symmetric, accuracy_level=level,
        nodes_to_exclude=exclude, algo_config=algo,
    )
    # k_quant and GPTQ draw a progress bar with print(): on stdout it would break `--json`'s
    # one document there; progress belongs on stderr.
    with contextlib.redirect_stdout(sys.stderr):
        quantizer.process()
    out = quantizer.model.model
    _unhide_weights(out, hidden)
    _restore_inputs(out, idle, order)
    if level:
        # HQQ does not write accuracy_level; the others do. Set it on every MatMulNBits this
        # pass made so the recipe's compute type holds whichever algorithm made the weights
        # (an earlier pass's nodes keep theirs: another bits' level, or none at level 0).
        for node in out.graph.node:
            if node.op_type == "MatMulNBits" and node.name not in before and not any(
                a.name == "accuracy_level" for a in node.attribute
            ):
                node.attribute.append(onnx.helper.make_attribute("accuracy_level", level))
    return out


def _restore_inputs(model: onnx.ModelProto, idle: list, order: list[str]) -> None:
    """Put back the unread graph inputs, every input at its original position."""
    by_name = {i.name: i for i in [*model.graph.input, *idle]}
    inputs = [by_name[n] for n in order if n in by_name]
    inputs += [i for i in model.graph.input if i.name not in set(order)]
    copies = [onnx.ValueInfoProto() for _ in inputs]
    for copy, value in zip(copies, inputs, strict=True):
        copy.CopyFrom(value)
    del model.graph.input[:]
    model.graph.input.extend(copies)


_HIDE = "_slmedge_hidden"


def _hide_weights(model: onnx.ModelProto, nodes: list[str]) -> dict[str, str]:
    """Route the weight of each excluded MatMul through an Identity.

    ORT's GPTQ path ignores ``nodes_to_exclude`` (only its RTN path honours it) and
    quantizes every MatMul whose ``B`` is an initializer; a weight behind an Identity is
    not one. :func:`_unhide_weights` removes the Identities again.
    """
    wanted = set(nodes)
    hidden = {}
    for node in model.graph.node:
        if node.name in wanted and node.op_type == "MatMul":
            alias = node.input[1] + _HIDE + node.name
            hidden[alias] = node.input[1]
            node.input[1] = alias
    nodes_now = list(model.graph.node)
    del model.graph.node[:]
    # Identities first: their inputs are initializers, so the order stays topological.
    model.graph.node.extend(
        onnx.helper.make_node("Identity", [src], [alias], name=alias) for alias, src in hidden.items()
    )
    model.graph.node.extend(nodes_now)
    return hidden


def _unhide_weights(model: onnx.ModelProto, hidden: dict[str, str]) -> None:
    if not hidden:
        return
    keep = [n for n in model.graph.node if not (n.op_type == "Identity" and n.name in hidden)]
    for node in keep:
        for i, name in enumerate(node.input):
            if name in hidden:
                node.input[i] = hidden[name]
    del model.graph.node[:]
    model.graph.node.extend(keep)


def _gptq_act(model: onnx.ModelProto, by_block: dict[int, set[str]], hessians: Hessians | None,
              recipe: QuantRecipe, say: Say) -> onnx.ModelProto:
    """ORT's quantizer writes asymmetric RTN MatMulNBits nodes (integer zero points; one
    pass per block size); then gptq.py gives each the weights GPTQ chooses on the float
    weights it replaced."""
    if hessians is None:
        raise ValueError("gptq-act needs calibration statistics (hessians)")
    inits = {t.name: t for t in model.graph.initializer}
    targets = set().union(*by_block.values())
    mats = [n for n in model.graph.node
            if n.name in targets and n.op_type == "MatMul" and n.input[1] in inits]
    layered = getattr(hessians, "layered", None)
    if layered is not None:  # on the float graph, before the RTN pass below replaces it
        blocks = {n.name: b for b, nodes in by_block.items() for n in mats if n.name in nodes}
        say(f"gptq-act: {len(blocks)} MatMuls layer by layer, through the quantized layers")
        quantized = layered(model, blocks)  # reads one layer's weights at a time
    else:
        weights = {n.output[0]: numpy_helper.to_array(inits[n.input[1]]) for n in mats}
        inputs = {n.input[0]: weights[n.output[0]].shape[0] for n in mats}
        say(f"gptq-act: input statistics of {len(inputs)} activations on the calibration text")
        stats = hessians(inputs)
    for block, nodes in by_block.items():
        model = _run_nbits(model, nodes, bits=4, algorithm=Int4Algorithm.rtn, block_size=block,
                           symmetric=False, accuracy_level=recipe.level_for(4))
    if layered is not None:
        rewrite_matmul_nbits(model, quantized=quantized, say=say)
    else:
        rewrite_matmul_nbits(model, weights, stats, say=say)
    return model


def embedding_int8(model: onnx.ModelProto, gathers: list[str], block_size: int) -> list[str]:
    """Each named ``Gather`` of a float ``[vocab, K]`` table -> ``GatherBlockQuantized``
    (``bits=8``, uint8 data, default zero point 128), one scale ``max|w| / 127`` per block of
    ``block_size`` along ``K`` (a Q8_0 GGUF table: its own scales and values, exactly).
    ORT's quantizer writes only 4-bit lookups. Returns the rewritten nodes' names."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    wanted = set(gathers)
    done = []
    for idx, node in enumerate(list(graph.node)):
        if node.name not in wanted or node.op_type != "Gather" or node.input[0] not in inits:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        table = numpy_helper.to_array(inits[node.input[0]]).astype(np.float32)
        if axis != 0 or table.ndim != 2 or table.shape[1] % block_size:
            continue
        vocab, k = table.shape
        blocks = table.reshape(vocab, k // block_size, block_size)
        scale = np.abs(blocks).max(axis=2) / 127.0
        scale[scale == 0] = 1.0
        q = np.clip(np.round(blocks / scale[..., None]), -127, 127).astype(np.int16) + 128
        base = node.input[0] + "_int8"
        graph.initializer.extend([
            numpy_helper.from_array(q.astype(np.uint8).reshape(vocab, k), base),
            numpy_helper.from_array(scale.astype(table.dtype), base + "_scales"),
        ])
        gbq = onnx.helper.make_node(
            "GatherBlockQuantized", [base, node.input[1], base + "_scales"], list(node.output),
            name=node.name, domain="com.microsoft", gather_axis=0, quantize_axis=1,
            block_size=block_size, bits=8,
        )
        gbq.metadata_props.extend(node.metadata_props)
        graph.node.remove(node)
        graph.node.insert(idx, gbq)
        if not any(node.input[0] in n.input for n in graph.node):
            graph.initializer.remove(inits[node.input[0]])
        done.append(node.name)
    if done and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return done


def _quantize_embedding(model: onnx.ModelProto, facts: GraphFacts, recipe: QuantRecipe):
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    algo = mnq.DefaultWeightOnlyQuantConfig(
        block_size=recipe.block_size, is_symmetric=recipe.symmetric, op_types_to_quantize=("Gather",),
        quant_axes=(("Gather", 1),), bits=4,
    )
    others = {n.name for n in model.graph.node if n.op_type == "Gather"} - set(facts.embedding_gathers)
    quantizer = mnq.MatMulNBitsQuantizer(model, nodes_to_exclude=sorted(others), algo_config=algo)
    quantizer.process()
    return quantizer.model.model


def quantize_weight_only(
    model: onnx.ModelProto,
    facts: GraphFacts,
    recipe: QuantRecipe,
    *,
    body_bits: int,
    calibration_reader=None,
    hessians: Hessians | None = None,
    frequent_tokens: list[int] | None = None,
    say: Say = lambda _m: None,
) -> tuple[onnx.ModelProto, dict]:
    """int4 (``body_bits=4``) or int8-nbits (``body_bits=8``) weight-only quantization.

    ``frequent_tokens``: with ``recipe.lm_head_int8_tokens``, the tokens whose lm_head rows
    stay int8 (the rest int4). ``hessians``: the calibration statistics gptq-act needs.
    Returns the model and a dict ``node -> precision`` for every weight MatMul.
    """
    _quiet_ort_quantizer()
    keep = set(recipe.keep_layers)
    head = facts.lm_head
    body = {w.node for w in facts.body_matmuls() if w.layer not in keep}
    kept = {w.node for w in facts.body_matmuls() if w.layer in keep}
    head_prec = recipe.lm_head_precision
    precision: dict[str, str] = {}
    first = set(body)
    split = None
    if head and recipe.lm_head_int8_tokens and body_bits == 4 and frequent_tokens:
        vocab = next(w.n for w in facts.weight_matmuls if w.node == head)
        try:  # whole groups of ids (frequent_tokens(..., group)): logits reordered per group
            split = split_lm_head(model, head, frequent_tokens, group_size(vocab, len(frequent_tokens)))
        except ValueError:
            split = split_lm_head(model, head, frequent_tokens)
        say(f"lm_head split: {len(frequent_tokens)} frequent token rows int8, the rest int4 "
            "(symmetric RTN)")
        # The rare rows: symmetric RTN whatever the body's algorithm. HQQ's float zero points
        # would need fold_zero_points' correction MatMul over the whole vocabulary (SmolLM2:
        # 18 x 45056 floats, 3.2 MB read per token): measured ~0.6 ms per decode token more
        # for +0.5% perplexity less; 8192 int8 rows with symmetric int4 beat 4096 with HQQ on
        # both (tools/bench/bench_quant.py, README).
        model = _run_nbits(model, {split[1]}, bits=4, algorithm=Int4Algorithm.rtn,
                           block_size=recipe.block_size, symmetric=True,
                           accuracy_level=recipe.level_for(4))
        precision[split[1]] = "int4"
    elif head and head_prec.value == f"int{body_bits}":
        first.add(head)
    common = dict(block_size=recipe.block_size, symmetric=recipe.symmetric,
                  accuracy_level=recipe.level_for(body_bits))
    algorithm = recipe.int4_algorithm if body_bits == 4 else Int4Algorithm.rtn
    say(f"{len(first)} MatMuls -> MatMulNBits {body_bits}-bit ({algorithm.value})")
    by_block = {recipe.block_size: set(first)}
    if body_bits == 4 and recipe.mlp_block_size and recipe.mlp_block_size != recipe.block_size:
        mlp = {w.node for w in facts.weight_matmuls if w.mlp_input and w.node in first}
        if mlp:
            say(f"{len(mlp)} MLP input projections at block size {recipe.mlp_block_size}")
            by_block = {recipe.block_size: first - mlp, recipe.mlp_block_size: mlp}
    elif body_bits == 8:  # the int8 scheme's block per kind (QuantRecipe.block_sizes)
        by_block = {}
        for w in facts.weight_matmuls:
            if w.node in first:
                by_block.setdefault(recipe.block_for(w.kinds, lm_head=w.node == head),
                                    set()).add(w.node)
    if algorithm is Int4Algorithm.gptq_act:
        model = _gptq_act(model, by_block, hessians, recipe, say)
    else:
        for block, nodes in by_block.items():
            model = _run_nbits(model, nodes, bits=body_bits, algorithm=algorithm,
                               calibration_reader=calibration_reader,
                               **{**common, "block_size": block})
    precision.update({n: f"int{body_bits}" for n in first})
    second = set()
    if body_bits == 4:
        second |= kept  # sensitive layers one step up: int8
    if split:
        second.add(split[0])
    elif head and head_prec is TensorPrecision.int8 and head not in first:
        second.add(head)
    if second:
        say(f"{len(second)} MatMuls -> MatMulNBits 8-bit (lm_head / kept layers)")
        # level_for(8): 4 on the int4 scheme whatever its level (ORT's only fast 8-bit kernel)
        model = _run_nbits(model, second, bits=8, **{**common,
                                                     "accuracy_level": recipe.level_for(8)})
        precision.update({n: "int8" for n in second})
    if split:
        precision[head] = "int4+int8"
    for w in facts.weight_matmuls:
        precision.setdefault(w.node, "float")
    if recipe.embedding is TensorPrecision.int4 and facts.embedding_gathers:
        say(f"embedding -> GatherBlockQuantized int4 (block {recipe.block_size})")
        model = _quantize_embedding(model, facts, recipe)
        precision.update({g: "int4" for g in facts.embedding_gathers})
        if share_tied_int4_table(model):
            say("embedding lookup reads the tied lm_head's int4 table (stored once)")
    elif recipe.embedding is TensorPrecision.int8 and facts.embedding_gathers:
        say(f"embedding -> GatherBlockQuantized int8 (block {recipe.block_size})")
        done = embedding_int8(model, facts.embedding_gathers, recipe.block_size)
        precision.update({g: "int8" for g in done})
    return model, precision
