"""One entry point: ``quantize_model(src, dst, recipe)`` for every scheme.

The scheme-specific work lives beside this file (:mod:`.weight_only`, :mod:`.qdq`); here
the graph is prepared (Gemm -> MatMul + Add), analysed once, dispatched through a table of
per-scheme strategies (:data:`STRATEGIES`), and the
result summarised for the manifest (which op types were quantized and which stayed
float, with the reason).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

from .calibration import KVCacheCalibrationReader, calibration_text
from .fold_zero_points import fold_and_say
from .gptq import collect_hessians
from .gptq_layered import gptq_layered
from .graph import GraphFacts, analyze, fold_weight_transposes, split_gemms
from .head_split import frequent_tokens, group_size
from .pack_matmuls import pack_shared_input_matmuls
from .recipe import (
    CalibrationConfig, Int4Algorithm, Int8Format, QuantRecipe, QuantScheme, TensorPrecision,
)
from .qdq import quantize_static_qdq
from .weight_only import quantize_weight_only

Say = Callable[[str], None]
TWO_GB = 2 * 1024**3
#: gptq-act's default prompt chunks of calibration text (CalibrationConfig.prefill_samples)
GPTQ_PREFILL_SAMPLES = 64
#: gptq-act one layer at a time through the quantized prefix (gptq_layered.py); False: the
#: whole float graph's Hessians at once (gptq.collect_hessians), kept for comparison
GPTQ_LAYERED = True


class _LayeredGptq:
    """gptq-act's calibration for weight_only: ``layered(model, blocks)`` runs
    gptq_layered over the reader's samples (the reader's full-graph session is closed
    first: the segments have their own)."""

    def __init__(self, reader: KVCacheCalibrationReader, say: Say):
        self.reader, self.say = reader, say

    def layered(self, model: onnx.ModelProto, blocks: dict[str, int]):
        samples = list(self.reader.samples())
        self.reader.close()
        return gptq_layered(model, blocks, samples, say=self.say).quantized


@dataclass
class QuantReport:
    """What was done to the graph; goes into the manifest under ``quantization``."""

    recipe: dict
    label: str
    weight_precision: dict[str, int]  # precision -> count of weight MatMuls
    embedding: str
    lm_head: str
    op_decisions: dict  # op type -> {"quantized": n, "float": m, "reasons": [...]}
    contrib_ops: list[str]
    calibration: dict | None
    seconds: float
    ort_tools: list[str] = field(default_factory=list)
    # "folded": HQQ's float zero points rewritten as default zero point + blocksum(x) @ M
    # (fold_zero_points.py), so MatMulNBits runs its fast kernels; None: nothing to fold
    zero_points: str | None = None
    # "folded-f16" / "folded-u12" / "folded-u8" only: the largest rounding of a zero point by
    # its fp16 M or code, in quantization steps of its block (QuantRecipe.zero_point_storage)
    zero_point_error: float | None = None
    # MatMulNBits nodes per (bits, accuracy_level) as written (nbits_levels): what runs. The
    # int4 scheme's 8-bit nodes are level 4 whatever the recipe's level (QuantRecipe.level_for)
    accuracy_levels: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def nbits_levels(model: onnx.ModelProto) -> list[dict]:
    """How many ``MatMulNBits`` nodes of each ``bits`` carry each ``accuracy_level`` (0: the
    attribute unset, ONNX Runtime's default), e.g. ``[{"bits": 4, "accuracy_level": 1,
    "nodes": 120}, {"bits": 8, "accuracy_level": 4, "nodes": 1}]``."""
    count: Counter = Counter()
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            a = {x.name: x.i for x in node.attribute if x.name in ("bits", "accuracy_level")}
            count[(a.get("bits", 4), a.get("accuracy_level", 0))] += 1
    return [{"bits": bits, "accuracy_level": level, "nodes": n}
            for (bits, level), n in sorted(count.items())]


def quiet_ort_logging() -> None:
    """ORT's matmul_nbits_quantizer calls ``logging.basicConfig(level=INFO)`` on import, which
    turns on INFO for the root logger: one line per node on stderr from then on. Import it
    here, then put the root logger back to WARNING (our progress callback reports)."""
    import logging

    import onnxruntime.quantization.matmul_nbits_quantizer  # noqa: F401

    root = logging.getLogger()
    if root.level < logging.WARNING:
        root.setLevel(logging.WARNING)


def save_model(model: onnx.ModelProto, path: Path) -> bool:
    """Save ``model``; weights go to ``<name>.data`` only above 2 GB. Returns that choice."""
    from google.protobuf.message import EncodeError

    try:
        external = model.ByteSize() >= TWO_GB - (64 << 20)
    except EncodeError:  # "Failed to serialize proto": above 2 GB (Qwen2.5-0.5B fp32 plus
        external = True  # its tied table transposed for the lm_head: int8-static died here)
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=Path(path).name + ".data" if external else None)
    return external


def weight_only_table(model: onnx.ModelProto) -> dict:
    """The manifest's op table of a weight-only graph: quantized / float nodes per op type."""
    table: dict[str, dict] = {}
    for node in model.graph.node:
        row = table.setdefault(node.op_type, {"quantized": 0, "float": 0, "reasons": []})
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized", "DynamicQuantizeMatMul",
                            "MatMulInteger", "DynamicQuantizeLinear"):
            row["quantized"] += 1
        else:
            row["float"] += 1
    for row in table.values():
        if not row["quantized"]:
            row["reasons"].append("weight-only scheme: activations and this op stay float")
    return table


def _tokens_for_calibration(tokenizer_dir: Path | None, calibration: CalibrationConfig,
                            token_ids: Sequence[int] | None) -> list[int]:
    if token_ids is not None:
        return list(token_ids)
    from slmedge.runtimes.tokenizer import TextTokenizer

    from .calibration import calibration_text

    text = calibration_text(calibration).read_text(encoding="utf-8", errors="replace")
    return TextTokenizer(tokenizer_dir).encode(text)


@dataclass
class _Job:
    """What a scheme's strategy works on: the prepared graph, its facts, and where to write."""

    model: onnx.ModelProto
    facts: GraphFacts
    recipe: QuantRecipe
    src: Path
    dst: Path
    tmp: Path
    tokenizer_dir: Path
    calibration_ids: Sequence[int] | None
    say: Say

    @property
    def prepared(self) -> Path:
        """The prepared float graph on disk (calibration and ORT's file-based tools read it)."""
        return self.tmp / "prepared.onnx"

    def calibration(self, *, gptq_act: bool = False):
        """Save the prepared graph; its calibration reader and the manifest's account of it."""
        save_model(self.model, self.prepared)
        ids = _tokens_for_calibration(self.tokenizer_dir, self.recipe.calibration,
                                      self.calibration_ids)
        calibration = self.recipe.calibration
        if gptq_act and "prefill_samples" not in calibration.model_fields_set:
            # GPTQ's statistics want many rows (well above K = 1536 for SmolLM2's
            # down_proj) more than cache states: 64 prompt chunks of 128 tokens; 160
            # did no better on SmolLM2 (README)
            calibration = calibration.model_copy(update={"prefill_samples": GPTQ_PREFILL_SAMPLES})
        reader = KVCacheCalibrationReader(self.prepared, ids, calibration)
        doc = {**calibration.model_dump(mode="json"), "tokens_available": len(ids),
               "samples": len(reader)}
        if self.recipe.calibration.text is None and self.calibration_ids is None:
            from .calibration import DEFAULT_CALIBRATION_TEXT

            doc["text"] = str(DEFAULT_CALIBRATION_TEXT)
        return reader, doc


@dataclass
class _Done:
    """What a strategy did: per weight MatMul precision, the op table, ORT's tools used."""

    precision: dict[str, str]
    table: dict
    tools: list[str]
    calibration: dict | None = None
    zero_points: str | None = None
    zero_point_error: float | None = None


class _Strategy:
    """One scheme's quantization: ``check`` refuses a graph before any work, ``__call__``
    does the work."""

    #: pack MatMuls reading one input (gate/up) before quantizing: one activation
    #: quantization per layer for the weight-only kernels
    packs_matmuls = False

    def check(self, model: onnx.ModelProto, recipe: QuantRecipe) -> None:
        """Raise when this strategy cannot take ``model``; nothing by default."""

    def __call__(self, job: _Job) -> _Done:
        raise NotImplementedError


class _WeightOnly(_Strategy):
    """int4, and int8 as MatMulNBits 8-bit: weight-only blocks (weight_only.py), HQQ / RTN /
    ORT's GPTQ / gptq-act, an optional split lm_head, float zero points folded."""

    packs_matmuls = True

    def __init__(self, bits: int):
        self.bits = bits

    def __call__(self, job: _Job) -> _Done:
        recipe, facts, say = job.recipe, job.facts, job.say
        algorithm = recipe.int4_algorithm if self.bits == 4 else None
        gptq_act = algorithm is Int4Algorithm.gptq_act
        reader, calib_doc = None, None
        if algorithm in (Int4Algorithm.gptq, Int4Algorithm.gptq_act):
            reader, calib_doc = job.calibration(gptq_act=gptq_act)
        gptq_reader = reader.materialize() if reader is not None and not gptq_act else None
        frequent = None
        if self.bits == 4 and recipe.lm_head_int8_tokens and facts.lm_head:
            ids = _tokens_for_calibration(job.tokenizer_dir, recipe.calibration,
                                          job.calibration_ids)
            vocab = next(w.n for w in facts.weight_matmuls if w.node == facts.lm_head)
            rows = recipe.lm_head_int8_tokens
            frequent = frequent_tokens(ids, rows, vocab, group_size(vocab, rows))
            if not frequent or len(frequent) >= vocab:
                frequent = None  # nothing to split on: the whole lm_head stays int4
            calib_doc = {**(calib_doc or {}),
                         "text": None if job.calibration_ids is not None
                         else str(calibration_text(recipe.calibration)),
                         "tokens_available": len(ids),
                         "lm_head_int8_rows": len(frequent or [])}
        hessians = None
        if gptq_act and GPTQ_LAYERED:
            hessians = _LayeredGptq(reader, say)
        elif gptq_act:
            def hessians(names, _reader=reader):
                return collect_hessians(job.prepared, names, _reader.samples, say=say)
        model, precision = quantize_weight_only(job.model, facts, recipe, body_bits=self.bits,
                                                calibration_reader=gptq_reader,
                                                hessians=hessians,
                                                frequent_tokens=frequent, say=say)
        fold = fold_and_say(model, recipe.zero_point_storage.code_bits, say)
        save_model(model, job.dst)
        return _Done(precision, weight_only_table(model),
                     ["onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer"],
                     calib_doc, fold.label,
                     round(fold.max_zero_point_error, 4) if fold.compact else None)


class _DynamicInt8(_Strategy):
    """int8 as ORT's ``quantize_dynamic`` (QOperator: DynamicQuantizeMatMul)."""

    def __call__(self, job: _Job) -> _Done:
        precision, table = _dynamic_int8(job.model, job.facts, job.recipe, job.tmp, job.dst,
                                         job.say)
        return _Done(precision, table, ["onnxruntime.quantization.quantize_dynamic"])


class _StaticQdq(_Strategy):
    """int8-static and a16w8: QDQ calibrated on text (qdq.py), for graphs of standard ops."""

    def check(self, model: onnx.ModelProto, recipe: QuantRecipe) -> None:
        fused = sorted({n.op_type for n in model.graph.node if n.domain == "com.microsoft"})
        if fused:
            from slmedge.runtimes.errors import UsageError

            raise UsageError(
                f"{recipe.scheme.value} is QDQ for NPUs and needs a graph of standard ONNX ops; "
                f"this one is fused for ONNX Runtime's CPU provider ({', '.join(fused)}). Export "
                "with --no-fuse (NPU device profiles do) and quantize that artifact"
            )

    def __call__(self, job: _Job) -> _Done:
        recipe, facts = job.recipe, job.facts
        reader, calib_doc = job.calibration()
        keep = _a16w8_kept_float(job.model, facts) if recipe.scheme is QuantScheme.a16w8 else None
        table = quantize_static_qdq(job.prepared, job.dst, facts, recipe, reader,
                                    keep_float=keep, say=job.say)
        keep = set(recipe.keep_layers)
        head_float = recipe.lm_head_precision is TensorPrecision.float
        precision = {
            w.node: "float" if (w.layer in keep or (w.node == facts.lm_head and head_float))
            else "int8" for w in facts.weight_matmuls
        }
        return _Done(precision, table, ["onnxruntime.quantization.quantize_static (QDQ)"],
                     calib_doc)


def _a16w8_kept_float(model: onnx.ModelProto, facts: GraphFacts) -> dict[str, str]:
    """Node -> reason for the a16w8 nodes kept float beyond the op policy: the residual
    stream and the rotary angle, the rules of the static (NPU) graphs' a16w8 step
    (``exporter/onnx/static_shapes_qdq.py``). Without them SmolLM2-135M's dynamic a16w8
    graph scored perplexity 64,367 vs 33.1 (KL 7.72, top-1 4%): its residual stream reaches
    |x| ~23,000, so one 16-bit scale rounds the ordinary channels away. The embedding lookup
    stays 16-bit: it hands on the table's values (no massive ones), and a float lookup would
    store the table as fp32 (SmolLM2: +57 MB beside the lm_head's own transposed copy)."""
    from slmedge.exporter.onnx.static_shapes_qdq import (
        POSITION_REASON, RESIDUAL_REASON, position_path, residual_stream)

    stream = residual_stream(model.graph, facts.embedding_gathers)[0] - set(facts.embedding_gathers)
    keep = dict.fromkeys(stream, RESIDUAL_REASON)
    for name in position_path(model.graph):
        keep.setdefault(name, POSITION_REASON)
    return keep


#: (scheme, int8 kernel family or None) -> the strategy that quantizes it.
STRATEGIES: dict[tuple[QuantScheme, Int8Format | None], _Strategy] = {
    (QuantScheme.int4, None): _WeightOnly(bits=4),
    (QuantScheme.int8, Int8Format.nbits): _WeightOnly(bits=8),
    (QuantScheme.int8, Int8Format.qoperator): _DynamicInt8(),
    (QuantScheme.int8_static, None): _StaticQdq(),
    (QuantScheme.a16w8, None): _StaticQdq(),
}


def strategy_for(recipe: QuantRecipe) -> _Strategy:
    """The entry of :data:`STRATEGIES` for ``recipe``."""
    fmt = recipe.int8_format if recipe.scheme is QuantScheme.int8 else None
    return STRATEGIES[(recipe.scheme, fmt)]


def quantize_model(
    src: str | Path,
    dst: str | Path,
    recipe: QuantRecipe,
    *,
    tokenizer_dir: str | Path | None = None,
    calibration_ids: Sequence[int] | None = None,
    say: Say | None = None,
) -> QuantReport:
    """Quantize the decoder graph ``src`` into ``dst`` following ``recipe``.

    Static schemes and GPTQ need calibration tokens: ``calibration_ids``, or the
    recipe's calibration text tokenized with the tokenizer in ``tokenizer_dir`` (the
    artifact directory). The graph is prepared here; the scheme's strategy
    (:data:`STRATEGIES`) quantizes it.
    """
    say = say or (lambda _m: None)
    src, dst = Path(src), Path(dst)
    t0 = time.perf_counter()
    strategy = strategy_for(recipe)
    quiet_ort_logging()
    model = onnx.load(str(src))
    gemms = split_gemms(model)
    if gemms:
        say(f"{gemms} Gemm -> MatMul + Add (the weight-only quantizer takes MatMul)")
    folded = fold_weight_transposes(model)
    if folded:
        say(f"{folded} MatMul weights behind a Transpose folded (tied lm_head)")
    if strategy.packs_matmuls:
        packed = pack_shared_input_matmuls(model)
        if packed:
            say(f"{len(packed)} MatMul groups reading one input packed into one MatMul + Split "
                "(gate/up: one activation quantization per layer)")
    facts = analyze(model)
    strategy.check(model, recipe)
    with tempfile.TemporaryDirectory(prefix="slmedge-quant-", dir=dst.parent) as tmp:
        job = _Job(model, facts, recipe, src, dst, Path(tmp),
                   Path(tokenizer_dir) if tokenizer_dir else src.parent, calibration_ids, say)
        done = strategy(job)
    out = onnx.load(str(dst), load_external_data=False)
    contrib = sorted({f"{n.domain}.{n.op_type}" for n in out.graph.node
                      if n.domain not in ("", "ai.onnx")})
    return QuantReport(
        recipe=recipe.model_dump(mode="json"),
        label=recipe.label(),
        weight_precision=dict(Counter(done.precision.get(w.node, "float")
                                      for w in facts.weight_matmuls)),
        embedding=recipe.embedding.value if facts.embedding_gathers else "none",
        lm_head=done.precision.get(facts.lm_head, "none") if facts.lm_head else "none",
        op_decisions=done.table,
        contrib_ops=contrib,
        calibration=done.calibration,
        seconds=round(time.perf_counter() - t0, 2),
        ort_tools=done.tools,
        zero_points=done.zero_points,
        zero_point_error=done.zero_point_error,
        accuracy_levels=nbits_levels(out),
    )


def _dynamic_int8(model, facts, recipe: QuantRecipe, tmp: Path, dst: Path, say: Say):
    """ORT ``quantize_dynamic``: int8 per-channel weights, activations quantized per call."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    keep = set(recipe.keep_layers)
    targets = [w.node for w in facts.body_matmuls() if w.layer not in keep]
    if facts.lm_head and recipe.lm_head_precision is TensorPrecision.int8:
        targets.append(facts.lm_head)
    prepared = tmp / "dynamic-in.onnx"
    save_model(model, prepared)
    say(f"{len(targets)} MatMuls -> int8 dynamic (per-channel weights)")
    quantize_dynamic(
        str(prepared), str(dst), op_types_to_quantize=["MatMul"], nodes_to_quantize=targets,
        per_channel=recipe.per_channel, weight_type=QuantType.QInt8,
        extra_options={"MatMulConstBOnly": True},
    )
    chosen = set(targets)
    precision = {w.node: "int8" if w.node in chosen else "float" for w in facts.weight_matmuls}
    out = onnx.load(str(dst), load_external_data=False)
    return precision, weight_only_table(out)


def copy_support_files(src_dir: Path, dst_dir: Path, skip: set[str]) -> None:
    """Copy an artifact's tokenizer and config files (everything but the model and manifest)."""
    for p in sorted(src_dir.iterdir()):
        if p.is_file() and p.name not in skip:
            shutil.copy2(p, dst_dir / p.name)
