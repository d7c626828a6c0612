"""The device-profile schema: one typed object that picks providers, shapes the export and
says what the runner records.

Everything here is data with validation; no torch, no onnxruntime. Conflicts between
fields are rejected when the profile is read (not halfway through an export), each with
the field that conflicts and what would be allowed.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_STRICT = ConfigDict(extra="forbid", use_enum_values=False, frozen=True)


class OS(str, Enum):
    linux = "linux"
    android = "android"
    ios = "ios"
    macos = "macos"
    windows = "windows"


class Arch(str, Enum):
    x86_64 = "x86_64"
    arm64 = "arm64"
    armv7 = "armv7"


class Engine(str, Enum):
    onnxruntime = "onnxruntime"
    litert = "litert"


class ArtifactFormat(str, Enum):
    onnx = "onnx"
    ort = "ort"
    tflite = "tflite"


class ShapePolicy(str, Enum):
    dynamic = "dynamic"
    static = "static"


class Precision(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"


class QuantScheme(str, Enum):
    """Every quantization scheme, one name each: ``--quant``, the ONNX recipe
    (``QuantRecipe.scheme``), the TFLite config and a profile's ``recipe.quantization`` all
    take this type. Which ones a format offers: :data:`ONNX_SCHEMES`, :data:`TFLITE_SCHEMES`,
    :data:`PROFILE_SCHEMES`. Lives here, below the exporter, so profiles can name it too."""

    none = "none"  # keep the precision as is
    # ONNX (onnxruntime.quantization)
    int4 = "int4"  # weight-only MatMulNBits, 4-bit blocks
    int8 = "int8"  # int8 weights, activations quantized at run time
    int8_static = "int8-static"  # QDQ, activations calibrated on text (TFLite: FC/BMM only)
    a16w8 = "a16w8"  # QDQ, 16-bit activations, 8-bit weights (NPUs such as QNN HTP)
    # TFLite (ai-edge-quantizer recipes)
    fp32 = "fp32"  # no quantization (the TFLite path's name for none)
    fp16 = "fp16"  # fp16 weights, fp32 compute (weights cast up when the model loads)
    int8_dynamic = "int8-dynamic"  # int8 channel-wise weights, activations quantized per run
    int8_weight = "int8-weight"  # int8 channel-wise weights, dequantized: float compute
    int4_block32 = "int4-block32"  # int4 weights in blocks of 32, int8 dynamic activations


#: What ``slmedge export`` / ``slmedge quantize --quant`` offer for ONNX graphs.
ONNX_SCHEMES = (QuantScheme.int4, QuantScheme.int8, QuantScheme.int8_static, QuantScheme.a16w8)
#: What ``--format tflite`` offers (the ONNX names int8 / int4 / none are aliases there).
TFLITE_SCHEMES = (QuantScheme.fp32, QuantScheme.fp16, QuantScheme.int8_dynamic,
                  QuantScheme.int8_weight, QuantScheme.int4_block32, QuantScheme.int8_static)
#: What a profile's ``recipe.quantization`` may name (the TFLite path maps them on).
PROFILE_SCHEMES = (QuantScheme.none, *ONNX_SCHEMES)
#: The ONNX schemes written as QDQ with activation ranges calibrated on text: graphs of
#: standard ops for NPUs (no fused contrib ops), lm_head float or int8, float_ops allowed.
QDQ_SCHEMES = (QuantScheme.int8_static, QuantScheme.a16w8)


def require_scheme(value, offered: tuple[QuantScheme, ...], where: str) -> QuantScheme:
    """``value`` (a scheme or its name) when ``where`` offers it; a ValueError listing what
    ``where`` offers otherwise (not every scheme: a profile need not hear of TFLite's)."""
    name = value.value if isinstance(value, QuantScheme) else value
    if not isinstance(name, str) or name not in {s.value for s in offered}:
        raise ValueError(f"{where} does not offer quantization {name!r}; choose one of "
                         f"{', '.join(s.value for s in offered)}")
    return QuantScheme(name)


# -- provider options: one typed model per execution provider -----------------------------


class _Options(BaseModel):
    model_config = _STRICT

    def ort_options(self) -> dict[str, str]:
        """The provider options as ONNX Runtime takes them (string keys and values)."""
        return {}


class CpuOptions(_Options):
    """The default CPU provider (MLAS kernels) takes no options here; threads are set in
    ``runtime.threads``."""


class XnnpackOptions(_Options):
    intra_op_num_threads: int | None = Field(
        None, ge=1, description="XNNPACK's own thread pool size (default: runtime.threads)"
    )

    def ort_options(self) -> dict[str, str]:
        return {} if self.intra_op_num_threads is None else {
            "intra_op_num_threads": str(self.intra_op_num_threads)}


class NnapiOptions(_Options):
    """The NNAPI flags of ONNX Runtime (``NNAPIFlags`` in the Java/C API)."""

    use_fp16: bool = Field(False, description="NNAPI_FLAG_USE_FP16: relax fp32 to fp16")
    use_nchw: bool = Field(False, description="NNAPI_FLAG_USE_NCHW (API level >= 29)")
    cpu_disabled: bool = Field(
        True, description="NNAPI_FLAG_CPU_DISABLED: no nnapi-reference CPU; ORT's kernels "
        "run what the accelerator cannot (faster than NNAPI's reference CPU)")
    cpu_only: bool = Field(False, description="NNAPI_FLAG_CPU_ONLY: reference CPU only, "
                           "for validating results")

    @model_validator(mode="after")
    def _exclusive(self):
        if self.cpu_disabled and self.cpu_only:
            raise ValueError("cpu_disabled and cpu_only exclude each other; set one of them")
        return self

    def ort_options(self) -> dict[str, str]:
        flags = {"use_fp16": "NNAPI_FLAG_USE_FP16", "use_nchw": "NNAPI_FLAG_USE_NCHW",
                 "cpu_disabled": "NNAPI_FLAG_CPU_DISABLED", "cpu_only": "NNAPI_FLAG_CPU_ONLY"}
        return {flag: "1" for field, flag in flags.items() if getattr(self, field)}


class CoreMLModelFormat(str, Enum):
    MLProgram = "MLProgram"
    NeuralNetwork = "NeuralNetwork"


class CoreMLComputeUnits(str, Enum):
    ALL = "ALL"
    CPUAndNeuralEngine = "CPUAndNeuralEngine"
    CPUAndGPU = "CPUAndGPU"
    CPUOnly = "CPUOnly"


class CoreMLOptions(_Options):
    model_format: CoreMLModelFormat = Field(
        CoreMLModelFormat.MLProgram, description="ModelFormat: MLProgram (fp16, iOS 15+) or "
        "NeuralNetwork (older devices)")
    compute_units: CoreMLComputeUnits = Field(
        CoreMLComputeUnits.CPUAndNeuralEngine, description="MLComputeUnits")
    require_static_input_shapes: bool = Field(
        True, description="RequireStaticInputShapes: only take nodes whose shapes are fixed")
    enable_on_subgraphs: bool = Field(False, description="EnableOnSubgraphs (If/Loop bodies)")

    def ort_options(self) -> dict[str, str]:
        return {
            "ModelFormat": self.model_format.value,
            "MLComputeUnits": self.compute_units.value,
            "RequireStaticInputShapes": str(int(self.require_static_input_shapes)),
            "EnableOnSubgraphs": str(int(self.enable_on_subgraphs)),
        }


class QnnBackend(str, Enum):
    htp = "htp"
    cpu = "cpu"
    gpu = "gpu"


class HtpArch(str, Enum):
    """Hexagon tensor processor generations (Snapdragon 8 Gen 1: v69, 8 Gen 2: v73,
    8 Gen 3: v75, 8 Elite: v79)."""

    v68 = "68"
    v69 = "69"
    v73 = "73"
    v75 = "75"
    v79 = "79"


class HtpPerformanceMode(str, Enum):
    default = "default"
    burst = "burst"
    balanced = "balanced"
    high_performance = "high_performance"
    sustained_high_performance = "sustained_high_performance"
    power_saver = "power_saver"
    low_power_saver = "low_power_saver"
    high_power_saver = "high_power_saver"
    low_balanced = "low_balanced"
    extreme_power_saver = "extreme_power_saver"


class QnnOptions(_Options):
    backend_type: QnnBackend = Field(QnnBackend.htp, description="QNN backend library")
    soc_model: str | None = Field(
        None, pattern=r"^\d+$", description="Qualcomm SoC id (SM8550 / 8 Gen 2: 43, SM8650 / "
        "8 Gen 3: 57); required for htp, which on x86 Linux runs as an emulator of this SoC")
    htp_arch: HtpArch | None = Field(None, description="HTP architecture (v73 = 8 Gen 2)")
    htp_performance_mode: HtpPerformanceMode = Field(
        HtpPerformanceMode.burst, description="HTP clock / power vote")
    enable_htp_fp16_precision: bool = Field(
        True, description="run fp32 graphs in fp16 on HTP (else fp32 ops are rejected)")

    @model_validator(mode="after")
    def _htp_needs_soc(self):
        if self.backend_type is QnnBackend.htp and self.soc_model is None:
            raise ValueError(
                "backend_type htp needs soc_model (e.g. '43' for Snapdragon 8 Gen 2, '57' for "
                "8 Gen 3): without it the HTP emulator cannot pick the chip"
            )
        return self

    def ort_options(self) -> dict[str, str]:
        opts = {"backend_type": self.backend_type.value,
                "htp_performance_mode": self.htp_performance_mode.value,
                "enable_htp_fp16_precision": str(int(self.enable_htp_fp16_precision))}
        if self.soc_model:
            opts["soc_model"] = self.soc_model
        if self.htp_arch:
            opts["htp_arch"] = self.htp_arch.value
        return opts


class _Provider(BaseModel):
    model_config = _STRICT

    def ort_options(self) -> dict[str, str]:
        return self.options.ort_options()  # type: ignore[attr-defined]


class CpuProvider(_Provider):
    name: Literal["CPUExecutionProvider"] = Field(description="execution provider name")
    options: CpuOptions = Field(default_factory=CpuOptions, description="provider options")


class XnnpackProvider(_Provider):
    name: Literal["XnnpackExecutionProvider"] = Field(description="execution provider name")
    options: XnnpackOptions = Field(default_factory=XnnpackOptions, description="provider options")


class NnapiProvider(_Provider):
    name: Literal["NnapiExecutionProvider"] = Field(description="execution provider name")
    options: NnapiOptions = Field(default_factory=NnapiOptions, description="provider options")


class CoreMLProvider(_Provider):
    name: Literal["CoreMLExecutionProvider"] = Field(description="execution provider name")
    options: CoreMLOptions = Field(default_factory=CoreMLOptions, description="provider options")


class QnnProvider(_Provider):
    name: Literal["QNNExecutionProvider"] = Field(description="execution provider name")
    options: QnnOptions = Field(default_factory=QnnOptions, description="provider options")


Provider = Annotated[
    CpuProvider | XnnpackProvider | NnapiProvider | CoreMLProvider | QnnProvider,
    Field(discriminator="name"),
]
PROVIDER_NAMES = ("CPUExecutionProvider", "XnnpackExecutionProvider", "NnapiExecutionProvider",
                  "CoreMLExecutionProvider", "QNNExecutionProvider")
#: Providers that can only run standard ONNX ops (no com.microsoft contrib ops such as
#: MatMulNBits / GroupQueryAttention) and want fixed shapes: the NPU family.
ACCELERATORS = frozenset({"NnapiExecutionProvider", "CoreMLExecutionProvider",
                          "QNNExecutionProvider"})
#: Which operating systems each provider exists on (QNN on Linux: the x86 HTP emulator).
PROVIDER_OS = {
    "CPUExecutionProvider": set(OS),
    "XnnpackExecutionProvider": set(OS),
    "NnapiExecutionProvider": {OS.android},
    "CoreMLExecutionProvider": {OS.ios, OS.macos},
    "QNNExecutionProvider": {OS.android, OS.windows, OS.linux},
}


# -- the profile sections --------------------------------------------------------------------


class Device(BaseModel):
    """The target hardware, for humans and for the runner's record."""

    model_config = _STRICT

    os: OS = Field(description="operating system of the target")
    arch: Arch = Field(description="CPU architecture of the target")
    soc: str | None = Field(None, description="system on chip, e.g. 'BCM2712' or 'Snapdragon 8 Gen 2'")
    cpu: str | None = Field(None, description="CPU cores, e.g. '4x Cortex-A76 @ 2.4 GHz'")
    ram_budget_mb: int = Field(gt=0, description="memory the model may use on the target (MB)")


class Runtime(BaseModel):
    """How sessions are built: engine, threads and execution providers in order."""

    model_config = _STRICT

    engine: Engine = Field(Engine.onnxruntime, description="inference engine")
    threads: int | None = Field(None, ge=1, description="intra-op threads (None: engine default)")
    providers: list[Provider] = Field(
        min_length=1, description="execution providers in order of preference, with options; "
        "a missing one falls back to the next (an error with --strict)")
    allow_cpu_fallback: bool = Field(
        True, description="let ONNX Runtime's CPU kernels run nodes the providers cannot; false "
        "sets session.disable_cpu_ep_fallback=1 so any CPU fallback is an error")

    @field_validator("providers")
    @classmethod
    def _order(cls, providers):
        names = [p.name for p in providers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"provider(s) {', '.join(dupes)} listed twice; list each once")
        if "CPUExecutionProvider" in names[:-1]:
            raise ValueError("CPUExecutionProvider takes every node, so it must come last "
                             f"(order given: {', '.join(names)})")
        return providers


class Shapes(BaseModel):
    """Dynamic shapes, or a fixed context window with a fixed prefill chunk (NPUs)."""

    model_config = _STRICT

    policy: ShapePolicy = Field(ShapePolicy.dynamic, description="dynamic or static shapes")
    context_length: int | None = Field(
        None, ge=2, le=131072, description="static: KV-cache slots (prompt + generated tokens)")
    prefill_chunk: int | None = Field(
        None, ge=1, description="static: tokens the prefill graph takes per call")

    @model_validator(mode="after")
    def _static_needs_sizes(self):
        sized = self.context_length is not None or self.prefill_chunk is not None
        if self.policy is ShapePolicy.static:
            if self.context_length is None or self.prefill_chunk is None:
                raise ValueError("policy static needs both context_length and prefill_chunk")
            if self.prefill_chunk >= self.context_length:
                raise ValueError(f"prefill_chunk ({self.prefill_chunk}) must be smaller than "
                                 f"context_length ({self.context_length})")
        elif sized:
            raise ValueError("context_length / prefill_chunk apply only to policy static; "
                             "remove them or set policy: static")
        return self


class Recipe(BaseModel):
    """The default export recipe for the target."""

    model_config = _STRICT

    precision: Precision = Field(Precision.fp32, description="float precision of the graph")
    quantization: QuantScheme = Field(
        QuantScheme.none, description="quantization scheme: none, int4, int8, int8-static, a16w8")
    float_ops: list[str] = Field(
        default_factory=list, description="op types kept in float / 16-bit by static QDQ "
        "(measured: int8 Softmax, norms and the mask add destroy decoder accuracy)")
    fuse_norms: bool = Field(
        False, description="static-shape exports: fuse each RMSNorm chain (Pow, ReduceMean, "
        "Add eps, Sqrt, Reciprocal, Mul) into one SimplifiedLayerNormalization. QNN HTP runs it "
        "as its RmsNorm op, which stays finite where the decomposed chain's x^2 overflows fp16 "
        "(measured on the HTP emulator; NNAPI and CoreML have no such op)")
    int4_accuracy_level: int | None = Field(
        None, ge=0, le=4, description="int4: MatMulNBits accuracy level (compute type: 0 unset, "
        "1 fp32, 2 fp16, 3 bf16, 4 int8 activations); default: the quantizer's (4). Used by int4 "
        "ONNX exports only (a profile extending an ARM one with another scheme keeps it "
        "unused, not an error). On ARM CPUs "
        "with dot-product instructions level 4 runs another kernel than x86 (activations "
        "quantized per row, not per block: SmolLM2-135M's greedy text leaves x86's after 8 "
        "tokens under emulation); level 1 computes x86's model there (README, arm64 section)")

    @field_validator("quantization", mode="before")
    @classmethod
    def _offered(cls, value) -> QuantScheme:
        return require_scheme(value, PROFILE_SCHEMES, "a profile's recipe")

    @model_validator(mode="after")
    def _consistent(self):
        if self.precision is Precision.fp16 and self.quantization is not QuantScheme.none:
            raise ValueError(f"quantization {self.quantization.value} starts from fp32 weights; "
                             "use precision fp32 with it, or quantization none with fp16")
        if self.float_ops and self.quantization not in QDQ_SCHEMES:
            raise ValueError("float_ops applies to static QDQ (int8-static, a16w8) only")
        return self


class ArtifactSpec(BaseModel):
    """What files the target loads."""

    model_config = _STRICT

    formats: list[ArtifactFormat] = Field(
        min_length=1, description="formats to write: onnx, ort (ORT mobile), tflite (LiteRT)")
    required_operators_config: bool = Field(
        False, description="write ORT's required_operators.config for a reduced mobile build")

    @model_validator(mode="after")
    def _ops_config_needs_ort(self):
        if self.required_operators_config and ArtifactFormat.ort not in self.formats:
            raise ValueError("required_operators_config comes with the ort format; add 'ort' "
                             "to formats")
        return self


class DeviceProfile(BaseModel):
    """A named target: device facts, session recipe, shape policy and export recipe."""

    model_config = _STRICT

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$", description="profile name")
    description: str = Field("", description="one line for `slmedge profiles list`")
    extends: str | None = Field(None, description="built-in profile (or YAML path) this one "
                                "starts from; its fields are overridden by this file's")
    device: Device = Field(description="target hardware")
    runtime: Runtime = Field(description="session recipe")
    shapes: Shapes = Field(default_factory=Shapes, description="shape policy of the export")
    recipe: Recipe = Field(default_factory=Recipe, description="default export recipe")
    artifact: ArtifactSpec = Field(
        default_factory=lambda: ArtifactSpec(formats=[ArtifactFormat.onnx]),
        description="files the target loads")

    @model_validator(mode="after")
    def _conflicts(self):
        names = [p.name for p in self.runtime.providers]
        for name in names:
            if self.device.os not in PROVIDER_OS[name]:
                allowed = ", ".join(sorted(o.value for o in PROVIDER_OS[name]))
                raise ValueError(f"runtime.providers: {name} does not exist on "
                                 f"{self.device.os.value} (it runs on: {allowed})")
        accel = [n for n in names if n in ACCELERATORS]
        first = self.runtime.providers[0]
        if isinstance(first, QnnProvider) and first.options.backend_type is QnnBackend.htp \
                and self.shapes.policy is not ShapePolicy.static:
            raise ValueError("shapes.policy: QNN HTP rejects dynamic shapes ('Dynamic shape is "
                             "not supported yet'); set policy static with context_length and "
                             "prefill_chunk")
        for p in self.runtime.providers:
            if isinstance(p, CoreMLProvider) and p.options.require_static_input_shapes \
                    and self.shapes.policy is not ShapePolicy.static:
                raise ValueError("shapes.policy: CoreML require_static_input_shapes needs policy "
                                 "static, or set require_static_input_shapes false")
        if accel and self.recipe.quantization in (QuantScheme.int4, QuantScheme.int8):
            raise ValueError(
                f"recipe.quantization: {self.recipe.quantization.value} uses com.microsoft "
                f"contrib ops (MatMulNBits / DynamicQuantizeMatMul) that {accel[0]} cannot run; "
                "allowed with an accelerator: none, int8-static, a16w8")
        if not self.runtime.allow_cpu_fallback and not accel:
            raise ValueError("runtime.allow_cpu_fallback false needs an accelerator provider "
                             f"({', '.join(sorted(ACCELERATORS))}); a CPU-only profile has "
                             "nothing to fall back from")
        if self.recipe.fuse_norms and self.shapes.policy is not ShapePolicy.static:
            raise ValueError("recipe.fuse_norms applies to static-shape exports; a dynamic "
                             "export fuses its norms in the CPU fusion pipeline already. Set "
                             "shapes.policy static or drop fuse_norms")
        formats = set(self.artifact.formats)
        if self.runtime.engine is Engine.onnxruntime and ArtifactFormat.tflite in formats:
            raise ValueError("artifact.formats: tflite is loaded by engine litert, not "
                             "onnxruntime; drop tflite or set runtime.engine litert")
        if self.runtime.engine is Engine.litert and formats != {ArtifactFormat.tflite}:
            raise ValueError("artifact.formats: engine litert loads tflite only")
        return self

    @property
    def accelerator(self) -> str | None:
        """The first NPU-family provider of the profile, if any."""
        return next((p.name for p in self.runtime.providers if p.name in ACCELERATORS), None)

    def provider_specs(self) -> list[tuple[str, dict[str, str]]]:
        """``[(provider name, ORT options)]`` in order, as ONNX Runtime takes them."""
        return [(p.name, p.ort_options()) for p in self.runtime.providers]
