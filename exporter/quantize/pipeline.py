"""Quantize inside an artifact's staging directory, measure it, and enforce the quality gate.

Used by ``slmedge export --quant`` (after the fp32 graph passed the parity gate) and by
``slmedge quantize ARTIFACT`` (from an existing fp32 artifact, no re-export). The fp32
graph is the reference of the quality card; a candidate whose perplexity rises by more
than ``max_ppl_increase`` percent, whose mean KL exceeds ``max_kl_mean`` or whose top-1
agreement falls below ``min_top1_agreement`` is refused with :class:`QualityGateFailed`
(exit 3), and since everything happens in the staging directory nothing is left behind.

Weight-only recipes (int4 rtn/hqq, int8 nbits) stream (streaming.py: one weight in memory
at a time, byte-identical to quantize_model), so any model size quantizes; a result above
2 GB keeps its weights in ``model.onnx.data``, which the manifest lists as a model file.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import NamedTuple

import onnx
from pydantic import BaseModel, ConfigDict, Field

from slmedge.device_profiles.schema import QDQ_SCHEMES
from slmedge.runtimes.artifact import MANIFEST_NAME, open_artifact, sha256_file
from slmedge.runtimes.errors import QualityGateFailed, UsageError

from ..manifest import onnx_facts, write_manifest
from slmedge.exporter.quality.card import DEFAULT_EVAL_TEXT, QualitySettings, artifact_card
from ..quiet import quiet_libraries
from ..staging import check_output, staged_directory
from . import tied_table
from .auto import candidates
from .calibration import calibration_text
from .core import QuantReport, copy_support_files, quantize_model
from .external_data import TensorSource, load_graph
from .graph import analyze
from .lazy_graph import LazyWeights, fold_weight_transposes, split_gemms
from .recipe import Int4Algorithm, QuantRecipe, QuantScheme
from .streaming import ExactBlocks, quantize_file_streaming, streaming_unsupported

Say = Callable[[str], None]
MODEL_FILE = "model.onnx"
DATA_FILE = MODEL_FILE + ".data"
#: a quantized graph smaller than this (graph + weights) is kept as one file, as
#: core.save_model does; above it the weights stay in model.onnx.data
ONE_FILE_BELOW = 2 * 1024**3 - (64 << 20)


#: Perplexity alone passes a model whose next-token distribution moved a lot (issue 16:
#: Gemma-3-270M's int4 at -1.0% perplexity had mean KL 0.248 and top-1 agreement 69%), so the
#: gate also bounds the mean KL and the top-1 agreement on the evaluation text. Measured
#: cards these defaults keep passing (4096 tokens of eval_mansfield_park.txt unless said):
#: SmolLM2-135M int4 default (hqq) KL 0.0033 / top-1 95.7%, int4 gptq-act (bench_quant's
#: fast recipe) KL 0.071 and int4-b32 gptq-act 0.064, int8 KL 0.0036 / 95.6%; the tiny
#: random-weight fixtures' int8-static 0.0006 / 89.8% and a16w8 0.0001 / 94.9% (256 tokens),
#: their int4 recipes KL 0.005-0.014 at top-1 58-77% (near-flat distributions, so top-1 ties
#: are common there; hence the low top-1 default, which only catches a broken model).
#: Gemma-3-270M's int4 (KL 0.248) fails the KL bound; so does GenAI's int4 of SmolLM2 (0.41).
DEFAULT_MAX_KL_MEAN = 0.15
DEFAULT_MIN_TOP1 = 0.5


class CardReference(str, Enum):
    """What the quality card compares with (streamed_reference.py)."""

    auto = "auto"  # the fp32 graph's session; the source streamed when that would not fit
    graph = "graph"  # the fp32 graph's ONNX Runtime session
    streamed = "streamed"  # the source in PyTorch, one decoder layer at a time


class QualityConfig(BaseModel):
    """The quality card's inputs and the gate on it."""

    model_config = ConfigDict(extra="forbid")

    max_ppl_increase: float = Field(5.0, ge=0, description="gate: allowed perplexity rise, percent")
    max_kl_mean: float = Field(DEFAULT_MAX_KL_MEAN, ge=0, description="gate: allowed mean "
                               "KL(fp32 || quantized) of the next-token distributions, nats")
    min_top1_agreement: float = Field(DEFAULT_MIN_TOP1, ge=0, le=1, description="gate: least "
                                      "share of eval positions whose top-1 token matches fp32's")
    auto: bool = Field(False, description="try recipes from the smallest up; keep the smallest "
                       "inside the gate")
    eval_text: Path | None = Field(None, description="evaluation text; default: the packaged eval_mansfield_park.txt")
    eval_tokens: int = Field(4096, ge=2, description="score the first N tokens of the text")
    new_tokens: int = Field(64, ge=1, description="greedy tokens per prompt for agreement")
    threads: int | None = Field(None, ge=1, description="ORT threads while measuring")
    reference: CardReference = Field(
        CardReference.auto, description="the card's reference: auto (the fp32 graph's session; "
        "the source streamed layer by layer in PyTorch where that session would not fit in 80% "
        "of the available memory, or no fp32 graph was written), graph, or streamed (needs the "
        "source: slmedge export; an unquantized export then compares its graph with the source)")

    def settings(self) -> QualitySettings:
        return QualitySettings(eval_text=self.eval_text, eval_tokens=self.eval_tokens,
                               new_tokens=self.new_tokens)


def _check_readable(path: Path, what: str, flag: str) -> None:
    try:
        with open(path, "rb") as f:
            empty = not f.read(1)
    except OSError as e:
        raise UsageError(f"{what} '{path}' cannot be read ({e.strerror or e}); pass a readable "
                         f"UTF-8 file with {flag} FILE") from None
    if empty:
        raise UsageError(f"{what} '{path}' is empty; pass a UTF-8 text with {flag} FILE")


def needs_calibration_text(recipe: QuantRecipe, auto: bool = False) -> bool:
    """Whether quantizing with ``recipe`` reads the calibration text: static QDQ, GPTQ and
    gptq-act, a split lm_head (its frequent tokens), and ``--auto`` on int4 (it tries one)."""
    if recipe.scheme in QDQ_SCHEMES:
        return True
    if recipe.scheme is not QuantScheme.int4:
        return False
    return (recipe.int4_algorithm in (Int4Algorithm.gptq, Int4Algorithm.gptq_act)
            or recipe.lm_head_int8_tokens > 0 or recipe.large_table_int8_tokens > 0 or auto)


def check_quant_texts(recipe: QuantRecipe | None, quality: QualityConfig) -> None:
    """Fail with a usage error (exit 2) before any model is loaded when a quantization's texts
    are missing or unreadable: the evaluation text of its quality card and gate, and the
    calibration text when the recipe reads one. Nothing to check for ``recipe=None`` (fp32)."""
    if recipe is None:
        return
    path = quality.settings().text_path()  # a missing --eval-text FILE raises here
    if path is None:
        raise UsageError(
            "a quantized artifact needs an evaluation text for its quality card and gate; the "
            f"packaged one ({DEFAULT_EVAL_TEXT}) is missing, so this install is incomplete: "
            "reinstall slmedge or pass --eval-text FILE")
    _check_readable(path, "evaluation text", "--eval-text")
    if needs_calibration_text(recipe, quality.auto):
        # calibration_text raises a usage error naming the file when it does not exist
        _check_readable(calibration_text(recipe.calibration), "calibration text",
                        "--calibration")


def fp32_card(model_path: Path, tokenizer_dir: Path, quality: QualityConfig,
              say: Say = lambda _m: None) -> dict:
    """The short card of an unquantized export: its perplexity (its reference is itself)."""
    card = artifact_card(model_path, tokenizer_dir, quality.settings(), threads=quality.threads,
                         progress=say)
    if card is None:
        return {"skipped": "no evaluation text found; pass --eval-text FILE"}
    return card.to_dict()


def _model_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def quantize_candidate(reference: Path | None, out: Path, recipe: QuantRecipe,
                       tokenizer_dir: Path, say: Say = lambda _m: None,
                       exact: ExactBlocks | None = None,
                       graph: tuple[onnx.ModelProto, TensorSource] | None = None) -> QuantReport:
    """Quantize ``reference`` into ``out`` (+ ``out.data`` when it is large).

    Weight-only recipes stream (streaming.py: one weight in memory at a time, the same
    bytes as quantize_model); the others (calibrated, k_quant, int8 qoperator, static QDQ,
    a split lm_head) load the whole graph (core.quantize_model). A streamed graph below
    ``ONE_FILE_BELOW`` is folded back into one file, as quantize_model writes it.
    ``exact``: the source's own quantized blocks (a GGUF's Q4_0 / Q8_0), which the streaming
    path writes as they are where the recipe's bits and block size match. ``graph``: a graph
    never written and its weights' source instead of ``reference`` (quantize on write;
    streamed recipes only)."""
    if graph is None and streaming_unsupported(recipe) is not None:
        return quantize_model(reference, out, recipe, tokenizer_dir=tokenizer_dir, say=say)
    report = quantize_file_streaming(reference, out, recipe, progress=say, exact=exact,
                                     graph=graph, tokenizer_dir=tokenizer_dir)
    data = out.with_name(out.name + ".data")
    # A lookup reading the lm_head's bytes keeps them in the data file, which ORT maps: in one
    # file the session would hold the table beside the head's pre-packed copy
    # (tied_table.looks_up_head_bytes; Gemma 3 270M int4: 573 vs ~400 MB after load).
    if _model_bytes(out) < ONE_FILE_BELOW and not tied_table.looks_up_head_bytes(
            onnx.load(str(out), load_external_data=False)):
        model = onnx.load(str(out))  # the quantized weights only: a fraction of the fp32 model
        onnx.save_model(model, str(out))
        del model
        data.unlink()
    return report


def _card_budget() -> tuple[int, str]:
    """Bytes the card's reference session may take: as the export's verification session
    (export._session_plan's default)."""
    import psutil

    return int(psutil.virtual_memory().available * 0.8), "80% of the available memory"


def streamed_reason(reference: Path | None, quality: QualityConfig, source) -> str | None:
    """Why the card's reference is the source streamed in PyTorch (streamed_reference.py), or
    None for the fp32 graph's session. ``source``: the export's ``StreamedModel`` (None from
    ``slmedge quantize``, which has the fp32 artifact only)."""
    wanted = quality.reference
    if wanted is CardReference.streamed and source is None:
        raise UsageError("quality reference 'streamed' reads the source checkpoint layer by "
                         "layer; quantizing an fp32 artifact has no source: use reference auto "
                         "or graph, or quantize during slmedge export")
    if source is None or wanted is CardReference.graph:
        return None
    if wanted is CardReference.streamed:
        return "asked for (quality reference: streamed)"
    if reference is None:
        return "no fp32 graph was written"
    need = int(_model_bytes(reference) * 1.2)
    budget, where = _card_budget()
    if need <= budget:
        return None
    return (f"the fp32 graph's ONNX Runtime session needs ~{need / 1e6:.0f} MB and the card may "
            f"use {budget / 1e6:.0f} MB here ({where})")


def _card(out: Path, stage: Path, reference: Path | None, quality: QualityConfig, say: Say,
          timings: dict, source=None):
    """The candidate's card against the fp32 graph, or against the source streamed in PyTorch
    (:func:`streamed_reason`); the card's notes say why it was streamed."""
    why = streamed_reason(reference, quality, source)
    streamed = None
    if why is not None:
        from slmedge.exporter.quality.streamed_reference import StreamedReference, source_dtype

        config = source.model.config
        streamed = StreamedReference(config, source.weights,
                                     source_dtype=source_dtype(source.weights), progress=say)
        say(f"quality card reference: the {streamed.description}: {why}")
    card = artifact_card(out, stage, quality.settings(),
                         reference_model=None if streamed else reference,
                         threads=quality.threads, progress=say, timings=timings,
                         reference_source=streamed)
    if card is not None and why is not None:
        card.notes.append(f"reference streamed from the source: {why}; its greedy tokens are "
                          "the candidate's, scored by the reference (greedy.generated_by)")
    return card


def _attempt(reference: Path, stage: Path, recipe: QuantRecipe, quality: QualityConfig,
             out_name: str, say: Say, exact: ExactBlocks | None = None,
             source=None) -> tuple[dict, dict, Path]:
    # each candidate in its own directory: its weights file is model.onnx.data from the start
    # (the reference's own model.onnx.data may sit in the stage beside it)
    out = stage / out_name / MODEL_FILE
    out.parent.mkdir()
    say(f"quantizing: {recipe.label()}")
    t0 = time.perf_counter()
    report = quantize_candidate(reference, out, recipe, stage, say, exact).to_dict()
    t_quantized = time.perf_counter()
    why_not = streaming_unsupported(recipe)
    if exact is not None and why_not is not None:  # only the streaming path takes the blocks
        say(f"the source's quantized blocks are not kept: {why_not}")
        report["gguf_exact"] = {"tensors": 0, "skipped": f"recipe {recipe.label()} does not "
                                f"stream ({why_not}); every weight was quantized again"}
    card_timings: dict = {}
    card = _card(out, stage, reference, quality, say, card_timings, source)
    # where quantize_and_card's seconds go (issue 15): the quantizer's own, folding its
    # output into one file, the card's reference session + logits, the candidate's card
    t_card = time.perf_counter() - t_quantized
    report["timings_s"] = {
        "quantize": report["seconds"],
        "one_file": round(t_quantized - t0 - report["seconds"], 2),
        "card_reference": card_timings.get("reference"),
        "card_candidate": round(t_card - card_timings.get("reference", 0.0), 2),
    }
    if card is None:
        raise UsageError(
            "a quantized artifact needs an evaluation text for its quality card and gate; "
            "none was found: pass --eval-text FILE"
        )
    say(f"{recipe.label()}: {card.summary()}")
    return report, card.to_dict(), out


class _Criterion(NamedTuple):
    label: str
    key: str  # in the card and in a tried entry
    bound: str  # in gate_bounds()
    flag: str
    value: Callable[[float], str]
    limit: Callable[[float], str]
    upper: bool  # the bound is a maximum (else a minimum)


#: the gate's criteria, in the order they are checked and reported
GATE_CRITERIA = {
    "perplexity": _Criterion("perplexity", "ppl_increase_pct", "max_ppl_increase_pct",
                             "--max-ppl-increase", lambda v: f"{v:+.2f}%", lambda b: f"+{b:g}%",
                             True),
    "kl_mean": _Criterion("mean KL", "kl_mean", "max_kl_mean", "--max-kl-mean",
                          lambda v: f"{v:.4g}", lambda b: f"{b:g}", True),
    "top1_agreement": _Criterion("top-1 agreement", "top1_agreement_eval", "min_top1_agreement",
                                 "--min-top1-agreement", lambda v: f"{v:.1%}",
                                 lambda b: f"{b:.1%}", False),
}


def gate_bounds(quality: QualityConfig) -> dict:
    """The gate's bounds as the manifest's ``gate`` records them."""
    return {"max_ppl_increase_pct": quality.max_ppl_increase, "max_kl_mean": quality.max_kl_mean,
            "min_top1_agreement": quality.min_top1_agreement}


def gate_failures(card: dict, quality: QualityConfig) -> list[str]:
    """The criteria of the gate that ``card`` (a quality card's dict) fails, in
    :data:`GATE_CRITERIA` order: perplexity rise, mean KL, top-1 agreement."""
    bounds = gate_bounds(quality)
    return [name for name, c in GATE_CRITERIA.items()
            if (card[c.key] > bounds[c.bound] if c.upper else card[c.key] < bounds[c.bound])]


def _describe_failures(entry: dict, quality: QualityConfig) -> str:
    bounds = gate_bounds(quality)
    return "; ".join(
        f"{c.label} {c.value(entry[c.key])} {'>' if c.upper else '<'} "
        f"{c.limit(bounds[c.bound])} ({c.flag})"
        for c in (GATE_CRITERIA[name] for name in entry["failed"]))


def gate_error(tried: list[dict], quality: QualityConfig) -> QualityGateFailed:
    """The error of a gate that no candidate passed: every failed criterion of the last
    candidate with its value and bound, the flag that moves each bound, what to try next."""
    last = tried[-1]
    limit = quality.max_ppl_increase
    what = (f"none of the {len(tried)} recipes tried stays" if quality.auto
            else f"recipe {last['label']} does not stay")
    failed = sorted({f for t in tried for f in t["failed"]}, key=list(GATE_CRITERIA).index)
    return QualityGateFailed(
        f"quality gate failed: {what} within the gate (perplexity +{limit:g}%, mean KL "
        f"{quality.max_kl_mean:g}, top-1 agreement {quality.min_top1_agreement:.0%}); "
        f"last: {last['label']} perplexity {last['perplexity']:.3f}: "
        f"{_describe_failures(last, quality)} (best perplexity rise of the tried: "
        f"{min(t['ppl_increase_pct'] for t in tried):+.2f}%); nothing was written. Keep "
        "lm_head / more layers in higher precision, use a smaller --block-size or another "
        f"--algorithm,{'' if quality.auto else ' try --auto,'} or widen the bound ("
        + ", ".join(GATE_CRITERIA[f].flag for f in failed) + ")",
        {"max_ppl_increase": limit, "max_kl_mean": quality.max_kl_mean,
         "min_top1_agreement": quality.min_top1_agreement, "tried": tried},
    )


def _tried_entry(recipe: QuantRecipe, estimate: float | None, path: Path, card: dict,
                 quality: QualityConfig) -> dict:
    """A candidate's line in the manifest's ``gate.tried``."""
    failed = gate_failures(card, quality)
    return {
        "label": recipe.label(),
        "estimated_mb": round(estimate / 1e6, 2) if estimate is not None else None,
        "size_mb": round(_model_bytes(path) / 1e6, 2),
        "perplexity": round(card["perplexity"], 4),
        "ppl_increase_pct": round(card["ppl_increase_pct"], 3),
        "kl_mean": round(card["kl_mean"], 5),
        "top1_agreement_eval": round(card["top1_agreement_eval"], 4),
        "passed": not failed,
        "failed": failed,  # the criteria that made --auto move on (GATE_CRITERIA)
    }


def quantize_in_stage(stage: Path, recipe: QuantRecipe, quality: QualityConfig,
                      say: Say = lambda _m: None, reference: Path | None = None,
                      exact: ExactBlocks | None = None, source=None) -> dict:
    """Replace ``stage/model.onnx`` (fp32) by its quantized form; return manifest fields.

    ``reference``: the fp32 graph to quantize and compare with (default: the stage's own
    model.onnx, which is then replaced). ``exact``: the source's own quantized blocks
    (``GGUFWeights.exact_blocks``), kept where the recipe matches them. ``source``: the
    export's ``StreamedModel``, the card's reference where the fp32 graph's session would not
    fit (:func:`streamed_reason`).
    """
    reference = reference or stage / MODEL_FILE
    if quality.auto:
        # the graph's structure only: its weights stay where they are (lazy_graph.py)
        model = load_graph(reference)
        lazy = LazyWeights(model, TensorSource(reference.parent))
        split_gemms(model, lazy)
        fold_weight_transposes(model, lazy)
        ladder = candidates(recipe, analyze(model))
        del model
        say(f"--auto: {len(ladder)} candidate recipes, smallest first")
    else:
        ladder = [(recipe, None)]
    tried = []
    chosen = None
    for i, (cand, estimate) in enumerate(ladder):
        report, card, path = _attempt(reference, stage, cand, quality, f".candidate-{i}", say,
                                      exact, source)
        tried.append(_tried_entry(cand, estimate, path, card, quality))
        if tried[-1]["passed"]:
            chosen = (cand, report, card, path)
            break
        shutil.rmtree(path.parent)
    if chosen is None:
        raise gate_error(tried, quality)
    cand, report, card, path = chosen
    _install(path, stage, reference, report)
    return {
        "quantization": report,
        "quality": card,
        "gate": {**gate_bounds(quality), "passed": True, "auto": quality.auto, "tried": tried},
    }


def _install(path: Path, stage: Path, reference: Path | None, report: dict) -> None:
    """The chosen candidate (``path`` and its data file) becomes the stage's model."""
    final = stage / MODEL_FILE
    if reference == final:
        for stale in (final, stage / DATA_FILE):
            if stale.exists():
                stale.unlink()
    os.replace(path, final)
    data = path.with_name(DATA_FILE)
    report["external_data"] = data.exists()  # the manifest's model files then include it
    if data.exists():
        os.replace(data, stage / DATA_FILE)
    path.parent.rmdir()


def quantize_unwritten(stage: Path, graph: tuple[onnx.ModelProto, TensorSource],
                       recipe: QuantRecipe, quality: QualityConfig, why: str,
                       say: Say = lambda _m: None, exact: ExactBlocks | None = None,
                       source=None) -> dict:
    """Quantize on write (issue 15): ``graph`` (``graph_writer.graph_without_weights``: the
    export's graph, its weights read from the checkpoint one at a time) becomes the stage's
    ``model.onnx`` without an fp32 graph ever written; ``why``: the reason it is not (the
    fp32 verification session would not fit). Same bytes as quantizing the written fp32 graph
    (tests/parity/test_quant_on_write.py). With no fp32 graph there is no reference for the
    quality card in ONNX Runtime: given the export's ``source``, the card compares with the
    source streamed in PyTorch layer by layer (streamed_reference.py) and the gate applies;
    without it the card and the gate are recorded as skipped with ``why`` (sizes)."""
    out = stage / ".candidate-0" / MODEL_FILE
    out.parent.mkdir()
    say(f"quantizing on write: {recipe.label()}, each weight read from the source (no fp32 "
        "graph written)")
    t0 = time.perf_counter()
    report = quantize_candidate(None, out, recipe, stage, say, exact, graph=graph).to_dict()
    report["timings_s"] = {"quantize": report["seconds"],
                           "one_file": round(time.perf_counter() - t0 - report["seconds"], 2)}
    report["float_graph"] = f"not written ({why})"
    if streamed_reason(None, quality, source) is not None:
        t_card = time.perf_counter()
        card_timings: dict = {}
        card = _card(out, stage, None, quality, say, card_timings, source)
        report["timings_s"].update(
            card_reference=card_timings.get("reference"),
            card_candidate=round(time.perf_counter() - t_card - card_timings.get("reference", 0.0),
                                 2))
        if card is None:
            raise UsageError("a quantized artifact needs an evaluation text for its quality card "
                             "and gate; none was found: pass --eval-text FILE")
        say(f"{recipe.label()}: {card.summary()}")
        card = card.to_dict()
        tried = [_tried_entry(recipe, None, out, card, quality)]
        if not tried[0]["passed"]:
            raise gate_error(tried, quality)
        _install(out, stage, None, report)
        return {"quantization": report, "quality": card,
                "gate": {**gate_bounds(quality), "passed": True, "auto": False, "tried": tried}}
    _install(out, stage, None, report)
    skipped = (f"no fp32 reference here: {why}; the quantized graph was written without an "
               "fp32 graph (quantize on write)")
    say(f"quality card and gate skipped: {skipped}")
    return {
        "quantization": report,
        "quality": {"skipped": skipped},
        "gate": {**gate_bounds(quality), "passed": None, "skipped": skipped, "auto": False,
                 "tried": []},
    }


@quiet_libraries()  # ORT's int4 quantizer makes PyTorch warn on every run (quiet.py)
def quantize_artifact(
    source: Path,
    output: Path,
    recipe: QuantRecipe,
    quality: QualityConfig | None = None,
    *,
    overwrite: bool = False,
    say: Say = lambda _m: None,
) -> dict:
    """``slmedge quantize``: a quantized artifact from an fp32 one; returns its manifest."""
    quality = quality or QualityConfig()
    check_quant_texts(recipe, quality)  # before the model is read
    art = open_artifact(source)
    if art.info is None or art.info.kind == "bundle":  # validates the manifest (exit 2)
        raise UsageError(f"'{source}' is a {'bundle' if art.info else 'bare model file'}; pass "
                         "an artifact directory written by slmedge export")
    if art.info.recipe.quant:
        raise UsageError(
            f"'{source}' is already quantized ({art.info.recipe.quant}); quantize the fp32 "
            "artifact it was made from"
        )
    src_recipe = art.manifest["recipe"]  # copied verbatim (with any newer keys) below
    check_output(Path(output), overwrite)
    with staged_directory(Path(output), overwrite) as stage:
        copy_support_files(art.root, stage, skip={MANIFEST_NAME, art.model_path.name,
                                                  art.model_path.name + ".data"})
        fields = quantize_in_stage(stage, recipe, quality, say, reference=art.model_path)
        model_files = {MODEL_FILE} | ({DATA_FILE} if (stage / DATA_FILE).exists() else set())
        m = art.manifest
        manifest = write_manifest(stage, {
            "format": "onnx",
            "model_file": MODEL_FILE,
            "source": m.get("source"),
            "derived_from": {
                "artifact": str(Path(source).resolve()),
                "manifest_sha256": sha256_file(art.root / MANIFEST_NAME),
                "model_sha256": sha256_file(art.model_path),
                "recipe": src_recipe,
                "quality": m.get("quality"),
            },
            "architecture": m.get("architecture"),
            "recipe": {**src_recipe, "quant": fields["quantization"]["label"]},
            "io": m.get("io"),
            "onnx": onnx_facts(stage / MODEL_FILE),
            "stop_token_ids": m.get("stop_token_ids"),
            **fields,
            "verification": {**(m.get("verification") or {}),
                             "parity_note": "parity was checked on the fp32 source artifact; the "
                             "quantized graph is measured by the quality card"},
        }, model_files)
    return manifest


def load_manifest(path: Path) -> dict:
    return json.loads((Path(path) / MANIFEST_NAME).read_text())
