"""``slmedge export``: source -> ONNX with KV cache -> tokenizer + configs -> parity gate -> manifest.

The ONNX flow's own steps (:class:`OnnxSteps`: load, convert, parity, card, manifest fields);
the skeleton that runs them, stages the output and writes the manifest is
:mod:`.skeleton`, shared with the static-shape and TFLite flows.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from slmedge.device_profiles.schema import QDQ_SCHEMES
from slmedge.runtimes.errors import QualityGateFailed, UsageError
from slmedge.runtimes.sessions.onnx_decoder import OnnxDecoder

from slmedge.exporter.manifest import graph_io, onnx_facts
from slmedge.exporter.onnx.convert import DEFAULT_OPSET, weights_bytes
from slmedge.exporter.quality.parity import check_parity
from slmedge.exporter.passes import FusionOptions
from slmedge.exporter.quality.card import decoder_card
from slmedge.exporter.quality.memory import release_memory, verification_session_options
from slmedge.exporter.quantize.pipeline import (
    QualityConfig, check_quant_texts, quantize_in_stage, quantize_unwritten,
)
from slmedge.exporter.quantize.recipe import QuantRecipe
from slmedge.exporter.quantize.streaming import streaming_unsupported
from slmedge.exporter.skeleton import ExportSteps, Extra, run_steps
from slmedge.exporter.sources.load import DEFAULT_MODEL, open_source
from .streaming import export_streamed, export_unwritten, session_weights_bytes

MODEL_FILE = "model.onnx"
#: share of the available memory a quantized export's fp32 verification session may take
#: before the export quantizes on write instead (:func:`_quantize_on_write`)
ON_WRITE_SHARE = 0.5
Progress = Callable[[str], None]


class DType(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"


class DeviceCard(str, Enum):
    """How much of the quality card runs on the profile's accelerator during the export (the
    QNN HTP emulator on x86: minutes per 64-token chunk, ~1 h for SmolLM2-135M's full card)."""

    full = "full"
    short = "short"
    off = "off"


class ExportConfig(BaseModel):
    """Everything ``slmedge export`` needs; ``--dry-run`` prints it, ``--config`` reads it back."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(DEFAULT_MODEL, description="HF directory, hub id, .gguf file or embedded:NAME")
    output: Path = Field(..., description="artifact directory to write (replaced atomically)")
    dtype: DType = Field(DType.fp32, description="weight and activation precision of the graph")
    opset: int = Field(DEFAULT_OPSET, ge=17, le=23, description="ONNX opset of the default domain")
    external_data: bool | None = Field(
        None, description="weights in model.onnx.data; default: when the weights reach 1 GiB as "
        "ONNX Runtime's CPU session holds them, fp16 as fp32 (it then loads them without a "
        "second in-memory copy of the graph proto)"
    )
    overwrite: bool = Field(False, description="replace an existing non-empty output directory")
    parity_atol: float | None = Field(
        None, gt=0, description="override the architecture's logit tolerance for the parity gate"
    )
    quant: QuantRecipe | None = Field(
        None, description="quantize after the parity gate (onnxruntime.quantization); None: fp32"
    )
    quality: QualityConfig = Field(
        default_factory=QualityConfig, description="quality card inputs and the perplexity gate"
    )
    fuse: bool = Field(
        True, description="fuse the fp32 graph for ONNX Runtime (GroupQueryAttention with a shared "
        "KV buffer, norms, GELU, last-position logits); False keeps standard ONNX ops"
    )
    padding_mask: bool = Field(
        False, description="fused graphs: keep the exporter's attention mask in "
        "GroupQueryAttention so left-padded batches stay exact (~0.7 ms/token slower decode on "
        "SmolLM2-135M). Default: GQA masks from sum(attention_mask), exact for one sequence or "
        "right-padded rows, as ONNX Runtime GenAI's graphs"
    )
    max_context: int | None = Field(
        None, ge=2, description="fused graphs: the longest sequence (prompt + generated tokens) "
        "the artifact runs, at most the model's maximum. ONNX Runtime computes the rotary tables "
        "at load for every position the graph covers (Gemma 3 270M: 67 MB at its 32,768); the "
        "runtime refuses longer sequences with an error naming the cap. None: the model's "
        "maximum (max_position_embeddings). Recorded in the manifest (fusion)"
    )
    parity_reference_max_mb: float | None = Field(
        None, gt=0, description="largest PyTorch reference model (MB, in the export's dtype) the "
        "parity gate loads after the graph is written; above it parity is recorded as skipped. "
        "None: a quarter of the memory available at that point"
    )
    verify_session_max_mb: float | None = Field(
        None, gt=0, description="largest ONNX Runtime session (MB of weights as the CPU session "
        "holds them: fp16 as fp32 on x86, plus a fifth for its creation) the parity gate and an "
        "unquantized export's quality card may open; above it both are recorded as skipped with "
        "the sizes, and a streamed weight-only --quant (rtn, hqq, int8 nbits; not --auto) is "
        "quantized on write: no fp32 graph is written. None: 80% of the memory available"
    )
    profile: str | None = Field(
        None, description="device profile (built-in name or YAML file): its recipe sets dtype, "
        "quantization, static shapes and formats unless given explicitly (onnx/profile.py)"
    )
    device_card: DeviceCard | None = Field(
        None, description="quantized static-shape profile exports: the quality card "
        "on the profile's accelerator when it runs here (QNN HTP emulator). full: 256-token "
        "perplexity window and 3 greedy prompts x 16 tokens; short: one prefill chunk and 1 "
        "prompt x 4 tokens; off: none (the CPU card gates). None: full. The choice is in "
        "the manifest"
    )

    @model_validator(mode="after")
    def _device_card_needs_profile(self):
        if self.device_card is not None and not self.profile:
            raise ValueError(f"device_card {self.device_card.value} applies to an export with a "
                             "device profile (the card runs on its accelerator); add --profile, "
                             "e.g. android-qnn-htp, or drop --device-card")
        return self


def _reference_budget(config: ExportConfig) -> int:
    """Bytes a PyTorch reference model may take for the parity gate: the configured limit, or
    a quarter of the memory available now (loading a checkpoint briefly needs about twice the
    model: transformers' GGUF path dequantizes the whole file before it fills the model)."""
    if config.parity_reference_max_mb is not None:
        return int(config.parity_reference_max_mb * 1e6)
    import psutil

    return psutil.virtual_memory().available // 4


def _verify_budget(config: ExportConfig, share: float) -> tuple[int, str]:
    """Bytes a verification session may take and where that figure comes from:
    ``verify_session_max_mb`` when given, else ``share`` of the memory available now."""
    if config.verify_session_max_mb is not None:
        return int(config.verify_session_max_mb * 1e6), "verify_session_max_mb"
    import psutil

    return (int(psutil.virtual_memory().available * share),
            f"{share:.0%} of the available memory")


#: an fp16 export's peak aim: its output plus 2 GB (issue 15). ONNX Runtime's CPU session holds
#: an fp16 graph's weights as fp32 on x86, twice the file, and ~1.2x that while it is created:
#: Qwen2.5-0.5B fp16 (0.99 GB) peaked at 3.2 GB there, Llama-3.2-1B (2.47 GB) at 6.7 GB. The
#: session keeps the weights fp16 when their fp32 copy would cost more than this above the
#: file: half the 2 GB; the other half is the export process's own (0.5-0.8 GB after the
#: trace at 0.5B-1B) and a card window's logits (512 x 152k fp32: 0.3 GB per copy).
FP16_COPY_MAX_EXTRA = 1 << 30


def _session_plan(config: ExportConfig, streamed) -> tuple[str | None, str | None]:
    """How the verification session (parity gate, card) is opened: ``(keep_fp16, why_not)``,
    ``keep_fp16`` being why an fp16 graph's weights stay fp16 in it (None: ONNX Runtime's
    default, an fp32 copy) and ``why_not`` why no session is opened at all.
    ONNX Runtime's CPU session holds every weight, fp16 ones as fp32 on x86, and took ~1.2x
    that while being created (Qwen2.5-0.5B fp16: 2.2 GB held, 2.4 GB at creation); an 8B fp16
    graph would need ~38 GB. An fp16 graph is opened with its weights kept fp16
    (``verification_session_options(keep_fp16=True)``: ~its file size; logits within one fp16
    step of the default session's, a slower decode step) when its fp32 copy would cost more
    than :data:`FP16_COPY_MAX_EXTRA` above the file or would not fit the budget. Small graphs
    (SmolLM2-135M: 0.38 GB extra) keep the default session."""
    held = session_weights_bytes(streamed.model)
    stored = weights_bytes(streamed.model)
    budget, source = _verify_budget(config, 0.8)
    fp16 = stored < held
    extra = held * 1.2 - stored
    if held * 1.2 <= budget and not (fp16 and extra > FP16_COPY_MAX_EXTRA):
        return None, None
    if fp16 and stored * 1.2 <= budget:
        why = (f"would not fit the {budget / 1e6:.0f} MB verification may use here ({source})"
               if held * 1.2 > budget else
               f"would add ~{extra / 1e6:.0f} MB to the export's peak (more than "
               f"{FP16_COPY_MAX_EXTRA / 1e6:.0f} MB)")
        return (f"fp16 weights kept fp16: their fp32 copy in ONNX Runtime's session (~"
                f"{held * 1.2 / 1e6:.0f} MB) {why}"), None
    kept = (f"; ~{stored * 1.2 / 1e6:.0f} MB with its fp16 weights kept fp16"
            if fp16 else "")
    return None, (f"ONNX Runtime's CPU session of this graph needs ~{held * 1.2 / 1e6:.0f} MB "
                  f"(its weights as it holds them, fp16 as fp32{kept}) and verification may "
                  f"use {budget / 1e6:.0f} MB here ({source}); the graph was not run here")


def _session_too_large(config: ExportConfig, streamed) -> str | None:
    """Why the verification session (parity gate, card) is not opened, or None when it fits
    (:func:`_session_plan`)."""
    return _session_plan(config, streamed)[1]


def _quantize_on_write(config: ExportConfig, streamed) -> str | None:
    """Why the quantized graph is written straight from the checkpoint's weights, without the
    fp32 graph, or None when the fp32 graph is written (and verified) first. On write: a
    streamed weight-only recipe (RTN, HQQ, int8 nbits, a GGUF's exact blocks) whose fp32
    verification session would not fit (:func:`_session_too_large`): that graph could not
    be run here anyway, and for an 8B model it is 32 GB of disk (Llama-3.1-8B). ``--auto``
    compares every candidate with the fp32 graph, so it keeps it.

    The fp32 session's budget here is half the available memory (``verify_session_max_mb``
    when given), not :func:`_session_too_large`'s 80%: it is decided before the trace, and the
    export, the quantizer and the candidate's session hold memory beside it. At 80%, the 3B
    Llama checkpoint's ~15.4 GB session was judged to fit at 20.2 GB available; the export then
    wrote its 12.9 GB fp32 graph, and the card's fp32 session would have passed the bench's
    14 GB watchdog (run stopped; issue 15's target is 8 GB)."""
    if config.quant is None or config.quality.auto or streaming_unsupported(config.quant):
        return None
    need = int(session_weights_bytes(streamed.model) * 1.2)
    budget, where = _verify_budget(config, ON_WRITE_SHARE)
    if need <= budget:
        return None
    return (f"ONNX Runtime's CPU session of the fp32 graph needs ~{need / 1e6:.0f} MB (its "
            f"weights as it holds them) and a quantized export's verification may use "
            f"{budget / 1e6:.0f} MB here ({where}); the fp32 graph was not run here")


def _parity_gate(config: ExportConfig, streamed, graph: Path, say: Progress,
                 open_decoder=None) -> dict:
    """Compare the written graph with the source in PyTorch, or say why not.

    The reference is the real model loaded in the export's dtype after the graph is written
    (so the two never overlap in memory) and released before ONNX Runtime loads the graph.
    A model whose reference does not fit the budget is not compared: the manifest says
    ``skipped`` with the sizes, and so does stderr. Raises QualityGateFailed on a mismatch."""
    need = weights_bytes(streamed.model)
    budget = _reference_budget(config)
    reference = (f"PyTorch {config.dtype.value} model filled from the source, tensor by tensor "
                 f"({need / 1e6:.0f} MB)")
    if need > budget:
        reason = (f"the PyTorch {config.dtype.value} reference needs {need / 1e6:.0f} MB and the "
                  f"parity gate may use {budget / 1e6:.0f} MB here (a quarter of the available "
                  "memory, or parity_reference_max_mb); the graph was not compared with PyTorch")
        say(f"parity gate skipped: {reason}")
        return {"skipped": reason, "passed": None, "reference": None}
    say("checking parity with PyTorch")
    # An explicit --parity-atol is the whole tolerance; the spec's adds a relative part.
    atol = config.parity_atol or streamed.spec.parity_atol
    rtol = 0.0 if config.parity_atol else streamed.spec.parity_rtol

    def load_reference():
        import copy

        from .lazy_weights import load_reference as fill

        model = fill(streamed.model.config, streamed.weights, next(streamed.model.parameters()).dtype)
        model.generation_config = copy.deepcopy(streamed.model.generation_config)
        return model

    parity = check_parity(load_reference, graph, atol=atol, rtol=rtol,
                          fp16=config.dtype is DType.fp16, open_decoder=open_decoder)
    if not parity.passed:
        raise QualityGateFailed(
            f"parity gate failed: ONNX logits differ from PyTorch by {parity.max_abs_diff:.3g} "
            f"(allowed {parity.atol:.3g}); nothing was written",
            parity.to_dict(),
        )
    return {**parity.to_dict(), "reference": reference}


def _unquantized_card(config: ExportConfig, streamed, stage: Path, parity: dict, open_graph,
                      say: Progress):
    """The card of an unquantized export: the graph's perplexity; and, where the parity gate
    could not load the PyTorch reference (too large) or ``quality.reference`` is
    ``streamed``, its comparison with the source streamed in PyTorch layer by layer
    (streamed_reference.py: perplexity, KL, top-1 and cosine over the windows; no greedy
    prompts), recorded before the graph's session opens."""
    import tempfile

    from slmedge.exporter.quantize.pipeline import CardReference

    settings = config.quality.settings()
    wanted = config.quality.reference
    stream = wanted is CardReference.streamed or (
        wanted is CardReference.auto and parity.get("skipped") is not None)
    if not stream:
        say("quality card: perplexity of the exported graph")
        return decoder_card(open_graph(), stage, settings, progress=say)
    from dataclasses import replace

    from slmedge.exporter.quality.streamed_reference import StreamedReference, source_dtype

    # no greedy prompts: the unquantized graph's card had none, and at this size each of
    # the candidate's 6 x 64 decode steps is seconds (the windows compare every position)
    settings = replace(settings, prompts=())
    say("quality card: the exported graph against the source, streamed layer by layer")
    reference = StreamedReference(streamed.model.config, streamed.weights,
                                  source_dtype=source_dtype(streamed.weights), progress=say)
    with tempfile.TemporaryDirectory(prefix=".card-reference-", dir=stage) as scratch:
        from slmedge.exporter.quality.streamed_reference import record_streamed_reference

        recorded = record_streamed_reference(reference, stage, settings,
                                             Path(scratch) / "logits", progress=say)
        if recorded is None:
            return None
        return decoder_card(open_graph(), stage, settings, reference=recorded, progress=say)


def export_onnx(config: ExportConfig, progress: Progress | None = None,
                command: str | None = None, extras: tuple[Extra, ...] = ()) -> dict:
    """The ONNX flow (no device profile, or a dynamic-shape one: ``extras``): stream the
    export, gate parity, quantize or card, write the manifest; returns it. ``slmedge export``
    enters through :func:`slmedge.exporter.pipeline.run_export`, which also handles profiles."""
    return run_steps(OnnxSteps(config), config.output, config.overwrite, progress,
                     command=command, extras=extras)


class OnnxSteps(ExportSteps):
    """The ONNX flow's steps (:func:`.skeleton.run_steps` runs them): the streamed export (or
    quantized on write), the parity gate on one ONNX Runtime session, then the quantizer and
    its card, or the unquantized graph's card."""

    def __init__(self, config: ExportConfig):
        self.config = config
        self.card_phase = "card" if config.quant is None else "quantize_and_card"
        # One ONNX Runtime session for the parity gate and the card (a session of a 0.5B fp16
        # graph took ~16-19 s to create here: ORT casts every fp16 weight to fp32 on x86),
        # opened after the gate's PyTorch reference is released.
        self.sessions: dict = {}

    def check(self) -> None:
        check_quant_texts(self.config.quant, self.config.quality)  # missing texts: exit 2

    def load(self, say: Progress):
        # Streaming: the model is traced with empty parameters and each weight is read from
        # the source when it is written (lazy_weights.py); nothing holds the whole model.
        return open_source(self.config.model, dtype=self.config.dtype.value, progress=say)

    def convert(self, stage: Path, streamed, say: Progress) -> dict[str, float]:
        config, model, spec = self.config, streamed.model, streamed.spec
        layers = spec.kv_layout(model.config)[0]
        # Static QDQ (int8-static, a16w8) targets NPUs, which need standard ops.
        static_qdq = config.quant is not None and config.quant.scheme in QDQ_SCHEMES
        fuse_options = None
        if config.fuse and config.dtype is DType.fp32 and not static_qdq:
            fuse_options = FusionOptions.from_hf_config(model.config, config.max_context,
                                                        padding_mask=config.padding_mask)
        elif config.max_context is not None:
            why = ("--no-fuse" if not config.fuse else f"dtype {config.dtype.value}"
                   if config.dtype is not DType.fp32 else f"--quant {config.quant.scheme.value}")
            raise UsageError(
                f"--max-context {config.max_context} caps the rotary tables of a fused graph, but "
                f"this export is not fused ({why}): its rotary is computed per position from "
                "position_ids, with no table to cap. Leave --max-context out")
        say(f"exporting {spec.family} ({layers} layers) to ONNX, {config.dtype.value}")
        self.on_write = _quantize_on_write(config, streamed)
        self.unwritten = None
        if self.on_write is None:
            self.info, fusion_report = export_streamed(
                streamed, stage / MODEL_FILE, opset=config.opset,
                external_data=config.external_data, fuse_options=fuse_options, say=say)
        else:
            say(f"the fp32 graph is not written, each weight is quantized as it is read: "
                f"{self.on_write}")
            self.info, fusion_report, self.unwritten = export_unwritten(
                streamed, stage / MODEL_FILE, opset=config.opset, fuse_options=fuse_options,
                say=say)
        release_memory()  # the tracer's garbage, before the verification sessions
        self.fusion = fusion_report.to_dict() if fusion_report is not None else None
        # seconds per phase (the benchmark reports them: bench_scale.py)
        return {**self.info.phases, "export": round(self.info.seconds, 2)}

    def open_graph(self, stage: Path):
        if "graph" not in self.sessions:
            self.sessions["graph"] = OnnxDecoder(
                stage / MODEL_FILE, threads=self.config.quality.threads,
                session_options=verification_session_options(keep_fp16=bool(self.keep_fp16)))
        return self.sessions["graph"]

    def parity(self, stage: Path, streamed, say: Progress) -> dict:
        config, on_write = self.config, self.on_write
        self.keep_fp16, too_large = _session_plan(config, streamed)
        self.too_large = too_large = on_write or too_large
        if self.keep_fp16 and too_large is None:
            say(f"verification session: {self.keep_fp16}")
        if on_write is not None:
            parity = {"skipped": f"{on_write}; the fp32 graph was not written (quantized on "
                      "write)", "passed": None, "reference": None}
            say(f"parity gate skipped: {parity['skipped']}")
        elif too_large is not None:
            say(f"parity gate and quality card skipped: {too_large}")
            parity = {"skipped": too_large, "passed": None, "reference": None}
        else:
            parity = _parity_gate(config, streamed, stage / MODEL_FILE, say,
                                  lambda: self.open_graph(stage))
        return parity

    def card(self, stage: Path, streamed, parity: dict, say: Progress) -> None:
        config = self.config
        self.parts = None
        if config.quant is not None:
            self.sessions.clear()  # the quantizer opens its own sessions
            # a GGUF's Q4_0 / Q8_0 blocks are written as they are where the recipe matches
            exact = getattr(streamed.weights, "exact_blocks", None)
            if self.unwritten is not None:
                quant_fields = quantize_unwritten(stage, self.unwritten, config.quant,
                                                  config.quality, self.on_write, say,
                                                  exact=exact, source=streamed)
                self.unwritten = None
            else:
                quant_fields = quantize_in_stage(stage, config.quant, config.quality, say,
                                                 exact=exact, source=streamed)
                quant_fields["quantization"]["float_graph"] = "written"
            # a quantized graph above 2 GB keeps model.onnx.data (a model file of the manifest)
            self.info.external_data = bool(
                quant_fields["quantization"].get("external_data", False))
            # its parts (quantizer, one-file fold, card reference / candidate): not numbers at
            # the top level, so a reader summing timings_s counts each second once
            self.parts = quant_fields["quantization"].pop("timings_s", None)
        elif self.too_large is not None:
            quant_fields = {"quality": {"skipped": self.too_large}}
        else:
            card = _unquantized_card(config, streamed, stage, parity,
                                     lambda: self.open_graph(stage), say)
            self.sessions.clear()
            quant_fields = {"quality": card.to_dict() if card is not None else
                            {"skipped": "no evaluation text found; pass --eval-text FILE"}}
        self.quant_fields = quant_fields

    def fields(self, stage: Path, streamed) -> tuple[dict, set[str]]:
        config, info, quant_fields = self.config, self.info, self.quant_fields
        model_files = {MODEL_FILE} | ({MODEL_FILE + ".data"} if info.external_data else set())
        return {
            "format": "onnx",
            "model_file": MODEL_FILE,
            "recipe": {
                "dtype": config.dtype.value,
                "opset": info.opset,
                "external_data": info.external_data,
                "quant": quant_fields.get("quantization", {}).get("label"),
            },
            "io": graph_io(stage / MODEL_FILE),
            "onnx": onnx_facts(stage / MODEL_FILE),
            "fusion": self.fusion,
            **quant_fields,
            "verification": ({"session": self.keep_fp16}
                             if self.keep_fp16 and self.too_large is None else {}),
            # load, trace, passes, write (export = trace + passes + write), support_files,
            # parity, card (or quantize_and_card), total
            **({"timings_s": {"quantize_and_card_parts": self.parts}}
               if config.quant is not None else {}),
        }, model_files
