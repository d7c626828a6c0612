"""QDQ quantization (a16w8 for QNN HTP, or int8-static) of the static-shape graphs.

"static" in this package means fixed shapes; the quantization is named QDQ (``quantize/qdq.py``).

The quantizer is issue 3's (``quantize.qdq.quantize_static_qdq`` on top of
``onnxruntime.quantization``); what is new here is the calibration data of the static
contract: real text run through the float prefill / decode graphs by the runtime's own
:class:`~slmedge.runtimes.sessions.static_decoder.StaticDecoder`, whose feeds (full fixed-size cache,
bias, positions) are recorded as samples, spread over the whole window.

Kept float, each with its reason in the manifest (``quantization.kept_float``):

* the attention-bias path (the -3.4e38 bias Add and the Softmax) and the profile's
  ``float_ops``: DESIGN.md measured int8 RMSNorm and Softmax diverging on HTP (cosine 0.52);
* the residual stream (:func:`residual_stream`): massive activations (SmolLM2-135M: |x|
  23,594 in a few channels at a few positions) give one 16-bit scale a step of ~0.7;
* the rotary angle (:func:`position_path`): position x inverse frequency grows with the
  position, and a calibrated range clips the positions the calibration did not reach.

Both graphs are quantized with one range per tensor (the union of their calibrations): a
decode step is a single token, too few activations for a range of its own.
SmolLM2-135M on CPU vs the float graphs (256 tokens): mean logit cosine 0.949 -> 0.997,
perplexity +37% -> +1.1% (artifacts/qnn/smollm2-a16w8-v2).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader

from slmedge.runtimes.generation import Decoder
from slmedge.runtimes.sessions.static_decoder import StaticDecoder

from slmedge.exporter.quality.card import QualityCard, quality_card
from .static_shapes import DECODE_FILE, PREFILL_FILE, WEIGHTS_FILE, share_weights


class FeedReader(CalibrationDataReader):
    """Recorded feeds, one per ``get_next``."""

    def __init__(self, feeds: list[dict]):
        self.feeds = feeds
        self._i = 0

    def get_next(self) -> dict | None:
        if self._i >= len(self.feeds):
            return None
        self._i += 1
        return self.feeds[self._i - 1]

    def rewind(self) -> None:
        self._i = 0

    def __len__(self) -> int:
        return len(self.feeds)


def record_feeds(root: Path, static: dict, token_ids: list[int], *, prefill_samples: int = 8,
                 decode_samples: int = 8, seed: int = 0) -> dict[str, list[dict]]:
    """Run the float graphs over ``token_ids`` and keep copies of what each graph was fed.

    The samples cover the whole window, because activation ranges depend on where in it a
    call is: a decode step on a short cache puts most attention probability on a few slots
    (a Softmax range calibrated on 192-slot caches only reached 0.34 in SmolLM2-135M's first
    layer and clipped short-cache steps), and the rotary angle grows with the position. So
    the decode samples' cache lengths are spread from 1 to ``context - 2``, one text passage
    each, and the prefill samples are chunks at offsets spread from 0 to the last chunk,
    each taken from a passage that reaches it."""
    decoder = StaticDecoder(root, static)
    context, chunk = decoder.context, decoder.chunk
    rng = np.random.default_rng(seed)
    lengths = sorted({int(x) for x in np.linspace(1, context - 2, max(1, decode_samples))})
    offsets = list(range(0, context - chunk + 1, chunk)) or [0]
    pick = np.unique(np.linspace(0, len(offsets) - 1, max(1, prefill_samples)).round().astype(int))
    # Each wanted offset is recorded in one passage long enough to hold a whole chunk there
    # (the longest passage always is).
    owner = {offsets[i]: int(rng.choice([j for j, n in enumerate(lengths)
                                         if n >= offsets[i] + chunk] or [len(lengths) - 1]))
             for i in pick}
    feeds: dict[str, list[dict]] = defaultdict(list)
    state = {"passage": -1}
    for kind, session in decoder.sessions.items():
        def recorder(names, feed, _run=session.run, _kind=kind):
            start = int(feed["position_ids"][0, 0])
            if _kind == "decode" or owner.get(start) == state["passage"]:
                feeds[_kind].append({k: np.array(v, copy=True) for k, v in feed.items()})
            return _run(names, feed)

        session.run = recorder  # instance attribute: only this decoder's sessions record
    for j, n in enumerate(lengths):
        state["passage"] = j
        begin = int(rng.integers(0, max(1, len(token_ids) - n - 1)))
        passage = token_ids[begin:begin + n + 1]
        decoder.reset()
        if n > 1:
            decoder.step(passage[:n])
        else:  # a one-token cache: the first token goes through the decode graph too
            feeds_before = len(feeds["decode"])
            decoder.step(passage[:1])
            del feeds["decode"][feeds_before:]
        decoder.step([passage[n]])
    return {"prefill": feeds["prefill"], "decode": feeds["decode"]}


def _bias_path(graph: onnx.GraphProto) -> set[str]:
    """Nodes from the attention-bias inputs up to (and including) the Softmax."""
    consumers = defaultdict(list)
    for node in graph.node:
        for i in node.input:
            consumers[i].append(node)
    frontier = [i.name for i in graph.input if i.name.startswith("attention_bias")]
    seen: set[str] = set()
    tensors: set[str] = set()
    while frontier:
        t = frontier.pop()
        if t in tensors:
            continue
        tensors.add(t)
        for node in consumers.get(t, []):
            if node.name in seen:
                continue
            seen.add(node.name)
            if node.op_type not in ("Softmax", "MatMul"):
                frontier.extend(o for o in node.output if o)
    return seen


#: Ops between a position input and the rotary Cos/Sin (the angle position x inv_freq).
_ANGLE_OPS = {"Unsqueeze", "Squeeze", "Cast", "Mul", "MatMul", "Concat", "Reshape", "Expand",
              "Transpose", "Slice", "Div", "Add", "Sub", "Cos", "Sin"}
#: Whole-norm ops: their output is the normalized x, not a statistic.
_NORM_OPS = {"SimplifiedLayerNormalization", "LayerNormalization", "RMSNormalization",
             "SkipSimplifiedLayerNormalization", "SkipLayerNormalization"}
#: Ops of a norm's statistics (x^2, mean, + eps, sqrt, 1/x) up to the op that scales x by them.
_NORM_STAT_OPS = {"Pow", "ReduceMean", "Add", "Sqrt", "Reciprocal", "Div", "Sub", "Mul", "Cast"}
POSITION_REASON = (
    "rotary angle (position x inverse frequency, up to context-1): a calibrated range clips "
    "the positions the calibration did not reach, so it stays float with Cos/Sin")
RESIDUAL_REASON = (
    "residual stream: massive activations (a few channels at a few positions reach |x| in "
    "the thousands) stretch a 16-bit range until ordinary values round away, so the ops "
    "writing the stream (residual Adds, an untied embedding lookup), the ops reading it (the "
    "norms' input) and the norms' statistics stay float")


def _graph_maps(graph: onnx.GraphProto):
    producer = {o: n for n in graph.node for o in n.output}
    consumers = defaultdict(list)
    for node in graph.node:
        for i in node.input:
            consumers[i].append(node)
    consts = {i.name for i in graph.initializer}
    consts |= {n.output[0] for n in graph.node if n.op_type == "Constant"}
    return producer, consumers, consts


def position_path(graph: onnx.GraphProto) -> set[str]:
    """Nodes from ``position_ids`` to (and including) the rotary ``Cos`` / ``Sin``: the angle
    grows with the position. Stops at anything else (a learned position table's Gather)."""
    _, consumers, _ = _graph_maps(graph)
    frontier = [i.name for i in graph.input if i.name.startswith("position_ids")]
    path: set[str] = set()
    while frontier:
        for node in consumers.get(frontier.pop(), []):
            if node.name in path or node.op_type not in _ANGLE_OPS:
                continue
            path.add(node.name)
            if node.op_type not in ("Cos", "Sin"):
                frontier.extend(o for o in node.output if o)
    # Keep only nodes that lead to a Cos/Sin: an angle, not some other use of the position.
    ops = {n.name: n for n in graph.node}
    leads: set[str] = {n for n in path if ops[n].op_type in ("Cos", "Sin")}
    changed = True
    while changed:
        changed = False
        for name in path - leads:
            if any(c.name in leads for o in ops[name].output for c in consumers.get(o, [])):
                leads.add(name)
                changed = True
    return leads


def residual_stream(graph: onnx.GraphProto, embedding_nodes: list[str]) -> tuple[set[str], set[str]]:
    """``(nodes, tensors)`` of the residual stream: its tensors are the embedding output and
    every Add of a stream tensor and a computed (non-constant) tensor; its nodes are the ones
    writing them (those Adds, the embedding lookup of an untied table), every node reading a
    stream tensor (norms, the next Add) and the norms' statistics (from those readers through
    x^2 / mean / + eps / sqrt / 1/x to the op scaling x). A tensor is quantized when any node writing or
    reading it is, so all of them stay float for the stream to stay float."""
    _, consumers, consts = _graph_maps(graph)
    by_name = {n.name: n for n in graph.node}
    tensors: set[str] = set()
    frontier = [o for name in embedding_nodes if name in by_name for o in by_name[name].output]
    # The lookup of a table nothing else reads stays float. A tied table is also the lm_head's
    # weight, quantized there: the lookup then reads that encoding (a float lookup would need
    # the whole table dequantized, and the HTP failed to finalize SmolLM2's prefill graph so,
    # QNN_COMMON_ERROR_MEM_ALLOC), and its output is the table's values, no massive ones.
    nodes: set[str] = {name for name in embedding_nodes if name in by_name
                       and len(consumers.get(by_name[name].input[0], [])) == 1}
    while frontier:
        t = frontier.pop()
        if t in tensors:
            continue
        tensors.add(t)
        for node in consumers.get(t, []):
            others = [i for i in node.input if i and i != t]
            scale = node.op_type in ("Mul", "Cast") and all(i in consts for i in others)
            residual_add = (node.op_type == "Add" and others and
                            not any(i in consts or i.startswith("attention_bias") for i in others))
            if (scale and not any(i in tensors for i in others)) or residual_add:
                nodes.add(node.name)  # embedding scale (Gemma) or a residual Add
                frontier.extend(o for o in node.output if o)
    readers = {c.name for t in tensors for c in consumers.get(t, [])}
    stats: set[str] = set()
    # Walk from the readers that compute statistics of x (x^2, mean); a whole-norm op (fused
    # RMSNorm / LayerNorm) outputs the normalized x, which its consumers may quantize.
    frontier = [by_name[r] for r in readers - nodes if by_name[r].op_type not in _NORM_OPS
                and all(i in tensors or i in consts or not i for i in by_name[r].input)]
    while frontier:
        node = frontier.pop()
        for o in node.output:
            for c in consumers.get(o, []):
                if c.name in stats or c.name in nodes or c.op_type not in _NORM_STAT_OPS:
                    continue
                stats.add(c.name)
                if not any(i in tensors for i in c.input):  # not yet the op that scales x
                    frontier.append(c)
    return nodes | readers | stats, tensors


def _kept_float(model: onnx.ModelProto, facts, float_ops: list[str]) -> tuple[dict[str, str], dict]:
    """Node -> reason for every node kept float beyond the op policy, and a summary per
    decision (node counts by op type) for the manifest."""
    from slmedge.exporter.quantize.qdq import MASK_PATH_REASON

    graph = model.graph
    ops = {n.name: n.op_type for n in graph.node}
    decisions = [
        ("attention bias path", _bias_path(graph), MASK_PATH_REASON),
        ("profile float_ops", {n.name for n in graph.node if n.op_type in float_ops},
         f"the profile's float_ops {sorted(float_ops)}"),
        ("rotary position path", position_path(graph), POSITION_REASON),
        ("residual stream", residual_stream(graph, facts.embedding_gathers)[0], RESIDUAL_REASON),
    ]
    keep: dict[str, str] = {}
    summary = {}
    for what, names, reason in decisions:
        for name in names:
            keep.setdefault(name, reason)
        counts = defaultdict(int)
        for name in names:
            counts[ops[name]] += 1
        summary[what] = {"nodes": dict(sorted(counts.items())), "reason": reason}
    return keep, summary


def quantize_static_graphs(root: Path, static: dict, recipe, token_ids: list[int], *,
                           float_ops: list[str], say=lambda _m: None) -> dict:
    """Replace ``prefill.onnx`` / ``decode.onnx`` in ``root`` by their QDQ forms (weights shared
    again); returns the decision tables for the manifest.

    Both graphs are calibrated (ORT's calibrator) and quantized with one range per tensor,
    the union of the two graphs' ranges (``merge_ranges``), when this onnxruntime takes
    precomputed ranges; else each graph calibrates on its own samples."""
    from slmedge.exporter.quantize.graph import analyze
    from slmedge.exporter.quantize.qdq import (
        calibrate_layered,
        calibrate_ranges,
        layered_calibration,
        merge_ranges,
        plan_static,
        quantize_static_qdq,
        save_ranges,
        static_writer,
        supports_range_cache,
    )

    cal = recipe.calibration
    feeds = record_feeds(root, static, token_ids, prefill_samples=min(cal.prefill_samples, 8),
                         decode_samples=min(cal.decode_samples, 8), seed=cal.seed)
    say(f"recorded calibration feeds of the static graphs ({len(feeds['prefill'])} prefill "
        f"chunks, {len(feeds['decode'])} decode steps over the {static['context_length']}-token window)")
    files = {"prefill": PREFILL_FILE, "decode": DECODE_FILE}
    work = root / ".qdq-work"
    work.mkdir(exist_ok=True)
    tables, protos, plans, kept, models = {}, {}, {}, {}, {}
    try:
        for kind, file in files.items():
            model = onnx.load(str(root / file), load_external_data=False)
            facts = analyze(model)
            keep, kept[kind] = _kept_float(model, facts, float_ops)
            plans[kind] = (facts, keep)
            models[kind] = model
        ranges, shared = {}, 0
        if supports_range_cache():
            op_types = sorted({op for kind, (facts, keep) in plans.items()
                               for op, row in plan_static(models[kind], facts, recipe, keep)[1].items()
                               if row["quantized"]})
            data = {}
            for kind, file in files.items():
                say(f"calibrating the {kind} graph on {len(feeds[kind])} samples "
                    f"({cal.method.value})")
                if layered_calibration(recipe):  # one decoder layer at a time (issue 15)
                    facts, keep = plans[kind]
                    data[kind] = calibrate_layered(
                        root / file, FeedReader(feeds[kind]), recipe, op_types,
                        nodes=plan_static(models[kind], facts, recipe, keep)[0], say=say)
                else:
                    data[kind] = calibrate_ranges(root / file, FeedReader(feeds[kind]), recipe,
                                                  op_types, work)
            merged, shared = merge_ranges(data, models)
            ranges = {k: save_ranges(v, work / f"{k}.ranges.json") for k, v in merged.items()}
            stream = residual_stream(models["prefill"].graph,
                                     plans["prefill"][0].embedding_gathers)[1]
            peak = max((float(np.max(np.abs(merged["prefill"].data[t].range_value)))
                        for t in stream if t in merged["prefill"].data), default=None)
            if peak is not None:
                for table in kept.values():
                    table["residual stream"]["calibrated_max_abs"] = round(peak, 1)
        del models
        for kind, file in files.items():
            facts, keep = plans[kind]
            dst = work / file
            tables[kind] = quantize_static_qdq(
                root / file, dst, facts, recipe, None if ranges else FeedReader(feeds[kind]),
                keep_float=keep, ranges=ranges.get(kind), say=say)
            protos[file] = onnx.load(str(dst))
        for stale in (PREFILL_FILE, DECODE_FILE, WEIGHTS_FILE):
            (root / stale).unlink()
        head = lm_head_precision(protos[DECODE_FILE])
        written, saved = share_weights(protos, root)
    finally:
        for p in sorted(work.rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        work.rmdir()
    label, head_doc = label_as_built(recipe, head)
    return {"scheme": recipe.scheme.value, "label": label, "lm_head": head_doc,
            "float_ops": float_ops, "kept_float": kept, "tables": tables,
            "ranges": (f"one per tensor, shared by the prefill and decode graphs ({shared} "
                       "tensors in both: the union of their calibrated ranges)") if ranges
                      else "per graph (this onnxruntime takes no precomputed ranges)",
            "writer": static_writer(recipe).value,  # the QDQ graphs' writer (segments / whole)
            "weights_bytes": written, "weights_bytes_saved_by_sharing": saved,
            "calibration_samples": {k: len(v) for k, v in feeds.items()}}


_QUANT_BITS = {onnx.TensorProto.UINT8: "int8", onnx.TensorProto.INT8: "int8",
               onnx.TensorProto.UINT16: "int16", onnx.TensorProto.INT16: "int16",
               onnx.TensorProto.UINT4: "int4", onnx.TensorProto.INT4: "int4"}


def label_as_built(recipe, head: str | None) -> tuple[str, dict]:
    """The recipe's label with its lm_head part saying how the graph holds the lm_head
    (``lm_head_precision``), and the manifest's ``lm_head`` entry.

    A tied lm_head reads Transpose(table): there is no constant weight for the recipe's
    lm_head rule to see, so the MatMul took the activation rule (its weight quantized like an
    activation, per tensor: 16-bit under a16w8)."""
    label, doc = recipe.label(), {"precision": head}
    asked = recipe.lm_head_precision.value
    token = {"float": "headf", "int8": "head8", "int4": "head4"}[asked]
    if head is not None and head != asked and token in label:
        label = label.replace(token, "head" + ("f" if head == "float" else head[3:]))
        doc["why"] = (f"the recipe asks {asked}; the lm_head reads its weight through a "
                      "Transpose (tied embeddings), so it was quantized with the activations")
    return label, doc


def lm_head_precision(model: onnx.ModelProto) -> str | None:
    """How the weight of the MatMul writing ``logits`` is held in a QDQ graph: ``float``, or
    ``int8`` / ``int16`` / ``int4`` after the DequantizeLinear that feeds it (its zero
    point's type); None when the graph has no such MatMul."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    inits = {t.name: t for t in graph.initializer}
    name = "logits"
    for _ in range(8):  # through the output's own Q/DQ pair and pass-through ops
        node = producer.get(name)
        if node is None:
            return None
        if node.op_type in ("MatMul", "Gemm"):
            break
        name = node.input[0]
    else:
        return None
    weight = producer.get(node.input[1])
    if weight is None or weight.op_type != "DequantizeLinear":
        return "float"
    zp = inits.get(weight.input[2]) if len(weight.input) > 2 and weight.input[2] else None
    if zp is None:  # DequantizeLinear without a zero point: the type of its input
        source = inits.get(weight.input[0])
        return _QUANT_BITS.get(source.data_type, "quantized") if source is not None else "int8"
    return _QUANT_BITS.get(zp.data_type, "quantized")


def static_quality(reference: Decoder, candidate: Decoder, token_ids: list[int], *,
                   prompts: int = 3, prompt_tokens: int = 16, new_tokens: int = 16,
                   window: int | None = None, eval_info: dict | None = None) -> QualityCard:
    """The quality card of ``candidate`` against ``reference`` (the float static graphs, or
    PyTorch through ``parity.TorchDecoder``) on one window of the static graphs' context: the
    ONNX flow's card (:func:`.quality.quality_card`, the same :class:`.quality.QualityCard` and
    manifest keys) with one window of at most ``reference.context`` tokens (perplexity of
    both, KL(reference || candidate), logit cosine) and greedy agreement / first divergence on
    ``prompts`` prompts of ``prompt_tokens`` tokens taken along ``token_ids``
    (``greedy.prompt_tokens``). ``eval_info`` is added to the card's ``eval``."""
    window = min(window or reference.context, reference.context, len(token_ids))
    ids = token_ids[:window]
    step = max(1, (len(token_ids) - prompt_tokens) // max(1, prompts))
    prompt_ids = [token_ids[p * step:p * step + prompt_tokens] for p in range(prompts)]
    card = quality_card(candidate, ids, reference=reference, prompt_ids=prompt_ids,
                        window=len(ids), stride=len(ids), new_tokens=new_tokens,
                        eval_info=eval_info)
    if card.greedy is not None:
        card.greedy["prompt_tokens"] = prompt_tokens
    return card
