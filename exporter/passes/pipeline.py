"""The fusion pipeline: cleanup, then each fusion in order; a count per fusion.

Callable on any ONNX decoder file with the slmedge / Optimum KV-cache contract
(:func:`fuse_onnx_file`), so that quantization can run on the fused graph afterwards.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx_ir as ir

from slmedge.runtimes.errors import UsageError

from .attention_gqa import GroupQueryAttentionFusion
from .cleanup import CleanupPass
from .gelu import GeluFusion
from .linear_3d import Linear3dFusion
from .logits_last import LogitsToKeep
from .rms_norm import RmsNormFusion
from .skip_layer_norm import SkipLayerNormFusion
from .skip_rms_norm import SkipRmsNormFusion
from .tied_head import TiedHeadOnce

#: graph metadata: the model's own maximum positions when the export capped them below it
#: (``--max-context``; the runtime's ``slmedge.max_sequence_length`` error names both)
MODEL_MAX_LENGTH_METADATA = "slmedge.model_max_sequence_length"


@dataclass
class FusionOptions:
    """What the passes cannot read from the graph itself."""

    #: positions covered by the rotary caches = longest sequence the fused graph runs
    max_sequence_length: int = 4096
    #: the model's own maximum (``max_position_embeddings``) when ``max_sequence_length`` is
    #: capped below it (``--max-context``): recorded so that the runtime's error can say how
    #: far a re-export could go. None: not capped
    model_max_sequence_length: int | None = None
    #: layer index -> sliding window (tokens a query attends to, itself included)
    sliding_windows: dict[int, int] = field(default_factory=dict)
    #: add the ``logits_to_keep`` input (last-position logits during generation)
    logits_to_keep: bool = True
    #: keep the exporter's attention mask inside GroupQueryAttention (``attention_bias``)
    #: so left-padded batches stay exact. Off (default), GQA masks by itself from
    #: ``seqlens_k = sum(attention_mask) - 1``, as ONNX Runtime GenAI's graphs do: one
    #: sequence or right-padded rows. The mask costs ~0.4 ms/token and feeding
    #: ``position_ids`` another ~0.3 on SmolLM2-135M decode (1 thread; README).
    padding_mask: bool = False
    #: a tied float embedding / lm_head table stored once as [1, K, V] (tied_head.py): ONNX
    #: Runtime then holds it once (SmolLM2-135M fp32: 623 MB after load instead of 737)
    tied_head_once: bool = True

    @classmethod
    def from_hf_config(cls, config, max_context: int | None = None, **overrides) -> "FusionOptions":
        """From a transformers config object or a config.json dict. ``max_context`` caps the
        positions the fused graph covers below the model's maximum: its rotary tables, which
        ONNX Runtime computes at load for every position (Gemma 3 270M: 67 MB at 32,768), and
        the KV cache the runtime may grow to."""
        get = (lambda k, d=None: config.get(k, d)) if isinstance(config, dict) else \
            (lambda k, d=None: getattr(config, k, d))
        max_len = int(get("max_position_embeddings", None) or get("n_positions", None) or 4096)
        model_max = None
        if max_context is not None:
            if max_context > max_len:
                raise UsageError(
                    f"--max-context {max_context} is more than this model's maximum of {max_len} "
                    "positions (max_position_embeddings); give at most "
                    f"{max_len}, or leave it out for the model's maximum")
            if max_context < max_len:
                max_len, model_max = int(max_context), max_len
        windows: dict[int, int] = {}
        window = get("sliding_window", None)
        layer_types = get("layer_types", None)
        if window and layer_types:
            windows = {i: int(window) for i, t in enumerate(layer_types) if t == "sliding_attention"}
        elif window and get("use_sliding_window", False):
            windows = {i: int(window) for i in range(int(get("num_hidden_layers", 0)))}
        return cls(max_sequence_length=max_len, model_max_sequence_length=model_max,
                   sliding_windows=windows, **overrides)


@dataclass
class FusionReport:
    counts: dict[str, int]
    notes: dict[str, list[str]]
    seconds: dict[str, float]
    ops_before: int
    ops_after: int
    #: which padded batches the fused attention is exact for (FusionOptions.padding_mask)
    padding: str = "one sequence or right-padded rows (GQA masks from sum(attention_mask))"
    #: positions the fused attention's rotary tables and KV cache cover (None: not fused)
    max_sequence_length: int | None = None
    #: the model's own maximum when max_sequence_length is capped below it (--max-context)
    model_max_sequence_length: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def fuse_model(model: ir.Model, options: FusionOptions | None = None) -> FusionReport:
    """Run cleanup and every fusion on ``model`` in place; return what each one did."""
    options = options or FusionOptions()
    ops_before = sum(1 for _ in model.graph)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    CleanupPass()(model)
    seconds["cleanup"] = time.perf_counter() - t
    gqa = GroupQueryAttentionFusion(options.max_sequence_length, options.sliding_windows,
                                    padding_mask=options.padding_mask)
    gelu = GeluFusion()
    fusions = [Linear3dFusion(), RmsNormFusion(), gqa, SkipRmsNormFusion(), SkipLayerNormFusion(),
               gelu]
    if options.logits_to_keep:
        fusions.append(LogitsToKeep())
    if options.tied_head_once:
        fusions.append(TiedHeadOnce())
    counts: dict[str, int] = {}
    notes: dict[str, list[str]] = {}
    for fusion in fusions:
        t = time.perf_counter()
        fusion(model)
        seconds[fusion.name] = time.perf_counter() - t
        counts[fusion.name] = fusion.count
        if fusion.reasons:
            notes[fusion.name] = fusion.reasons[:8]
    counts["RotaryEmbedding(in GroupQueryAttention)"] = gqa.rotary
    counts["packed QKV (GroupQueryAttention)"] = gqa.packed
    counts["BiasGelu/FastGelu+bias"] = getattr(gelu, "bias", 0)  # set by its fuse()
    counts["unused norm statistics outputs dropped"] = drop_unused_norm_outputs(model)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    ir.passes.common.TopologicalSortPass()(model)
    report = FusionReport(counts, notes, {k: round(v, 3) for k, v in seconds.items()},
                          ops_before, sum(1 for _ in model.graph))
    if options.padding_mask:
        report.padding = "left- or right-padded rows (exporter's mask as attention_bias)"
    if counts.get(gqa.name):
        report.max_sequence_length = options.max_sequence_length
        if options.model_max_sequence_length is not None:
            report.model_max_sequence_length = options.model_max_sequence_length
            model.metadata_props[MODEL_MAX_LENGTH_METADATA] = str(options.model_max_sequence_length)
    return report


#: ORT's fused norms: optional outputs 1 and 2 are the mean and inverse standard deviation
#: (training statistics). An output that has a name is computed and stored on every run.
_NORMS_WITH_STATS = {"SkipSimplifiedLayerNormalization", "SkipLayerNormalization",
                     "SimplifiedLayerNormalization", "LayerNormalization"}


def drop_unused_norm_outputs(model: ir.Model) -> int:
    """Blank the statistics outputs of fused norms that nothing reads (onnxscript's rules
    name them). Returns how many outputs were blanked."""
    dropped = 0
    for node in model.graph:
        if node.op_type not in _NORMS_WITH_STATS:
            continue
        for i, out in enumerate(node.outputs):
            if i in (1, 2) and out.name and not out.uses() and not out.is_graph_output():
                out.name = ""
                dropped += 1
    return dropped


def fuse_onnx_file(src: str | Path, dst: str | Path | None = None,
                   options: FusionOptions | None = None, *, external_data: bool | None = None) -> FusionReport:
    """Fuse an ONNX file (``dst`` defaults to overwriting ``src``).

    Without ``options``, a ``config.json`` beside ``src`` (an artifact directory) supplies
    the maximum length and sliding windows."""
    src = Path(src)
    dst = Path(dst) if dst is not None else src
    if options is None:
        config = src.parent / "config.json"
        options = FusionOptions.from_hf_config(json.loads(config.read_text())) if config.exists() \
            else FusionOptions()
    model = ir.load(str(src))
    report = fuse_model(model, options)
    data = src.with_name(src.name + ".data")
    if external_data is None:
        external_data = data.exists()
    # Written beside dst first: the source's weights are read lazily while saving.
    stage = dst.parent / f".{dst.name}.fusing"
    stage.mkdir(exist_ok=True)
    try:
        if external_data:
            ir.save(model, str(stage / dst.name), external_data=dst.name + ".data")
            (stage / (dst.name + ".data")).replace(dst.with_name(dst.name + ".data"))
        else:
            ir.save(model, str(stage / dst.name))
        (stage / dst.name).replace(dst)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return report
