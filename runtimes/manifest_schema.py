"""The typed, versioned manifest: ``manifest.json`` of an artifact and of a bundle.

``exporter/manifest.py`` validates every manifest it writes against :class:`Manifest`;
readers open one with :func:`load_manifest` (or ``open_artifact(path).info``) and read
fields, not dict keys. ``python -m slmedge.runtimes.manifest_schema`` prints the JSON Schema.

Versioning (``schema_version``): an integer major version (``1``), or ``"MAJOR.MINOR"``.
Additive changes (a new optional section or key) keep the major version: every model here
keeps unknown keys (``extra="allow"``), so an artifact written by a newer minor version
still loads and its extra keys survive a round trip. Anything a reader of this version could
misread (a renamed or retyped key) takes a new major version; an artifact of another major
version (or with none) is refused with exit 2, naming the version found, the one read here
and the command that writes it again (:func:`slmedge.runtimes.manifest_version.check_schema_version`,
which the pydantic-free runner on a Pi or phone uses too).

Kinds: an *artifact* manifest (``slmedge export`` / ``quantize`` / ``export --profile`` /
``export --format tflite``; no ``kind`` key) and a *bundle* manifest (``slmedge bundle``;
``kind: bundle``, its own version ``BUNDLE_SCHEMA_VERSION``).

History:
  1  the first manifest (schema_version 1), unchanged by this typed model: it only states
     what version 1 writers already wrote.
     Static-shape (profile) exports' quality cards have the ONNX card's keys since issue 13
     (one card function, ``exporter/quality/card.py``). Their old keys are read as aliases
     (:func:`_static_card_aliases`): ``tokens`` -> ``eval.tokens``; ``greedy_agreement``,
     ``first_divergence``, ``prompts``, ``new_tokens`` -> ``greedy.top1_agreement`` ...;
     the float card's ``gate: {max_ppl_increase, passed}`` -> the manifest's ``gate``
     (``max_ppl_increase_pct``), and a TFLite card's ``gate`` likewise. So an artifact written
     before loads with its figures in the fields a reader reads, and is written back (bundle,
     round trip) in the new form.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import UsageError, validation_problems
from .manifest_version import (
    BUNDLE_SCHEMA_VERSION,
    MANIFEST_NAME,
    MANIFEST_SCHEMA_VERSION,
    check_schema_version,
    read_manifest_json,
    reexport_command,
)

# Unknown keys are kept: a newer minor version's additions load and round-trip.
_OPEN = ConfigDict(extra="allow")


class FileEntry(BaseModel):
    """One file of the artifact or bundle (paths relative to its directory)."""

    model_config = _OPEN
    sha256: str = Field(description="hex sha256 of the file ('' while a bundle is staged)")
    size: int = Field(ge=0, description="bytes")
    role: str | None = Field(default=None, description="model (graph or weights), support, "
                             "tokenizer (bundles), snippet (bundles)")


class SourceInfo(BaseModel):
    """Where the model came from (``exporter/sources/info.py``)."""

    model_config = _OPEN
    kind: str = Field(description="hf-dir, hf-hub, gguf, embedded, ...")
    location: str = Field(description="path, hub id or embedded name as given")
    revision: str | None = Field(default=None, description="hub revision, if any")
    sha256: dict[str, str] | str | None = Field(
        default=None, description="sha256 of the source file(s): name -> hash, or one hash")


class Architecture(BaseModel):
    """What the runtimes size the KV cache from (``export.architecture_facts``)."""

    model_config = _OPEN
    model_type: str | None = Field(default=None, description="Hugging Face model_type")
    family: str = Field(description="architecture family of the registry")
    num_layers: int = Field(ge=1, description="decoder layers (KV cache entries per key/value)")
    kv_heads: int = Field(ge=1, description="key/value heads per layer")
    head_dim: int = Field(ge=1, description="size of one attention head")
    vocab_size: int = Field(ge=1, description="rows of the logits")
    parameters: int | None = Field(default=None, description="parameter count of the source")


class Recipe(BaseModel):
    """How the graph was made (every key optional: ONNX, static-shape and TFLite recipes
    differ)."""

    model_config = _OPEN
    dtype: str | None = Field(default=None, description="fp32, fp16 (ONNX exports)")
    opset: int | None = Field(default=None, description="ONNX opset exported at")
    external_data: bool | None = Field(default=None, description="weights in model.onnx.data")
    quant: str | None = Field(default=None, description="quantization label (None: float)")
    shapes: str | None = Field(default=None, description="static (profile exports)")
    fuse_norms: bool | None = Field(default=None, description="RMSNorms fused (static)")
    device_card: str | None = Field(default=None, description="static: device card setting")
    context_length: int | None = Field(default=None, description="TFLite KV cache length")
    prefill_chunks: list[int] | None = Field(default=None, description="TFLite prefill sizes")
    profile: str | None = Field(default=None, description="TFLite: the profile asked for")


class GraphIO(BaseModel):
    model_config = _OPEN
    inputs: list[str] = Field(description="graph inputs (initializers excluded)")
    outputs: list[str] = Field(description="graph outputs")


class OnnxFacts(BaseModel):
    """Opset, IR version and op counts of one graph (``exporter.manifest.onnx_facts``)."""

    model_config = _OPEN
    opset: int | None = Field(description="ai.onnx opset")
    opset_imports: dict[str, int] = Field(default_factory=dict, description="domain -> version")
    ir_version: int = Field(description="ONNX IR version")
    nodes: int | None = Field(default=None, description="node count")
    ops: dict[str, int] = Field(default_factory=dict, description="op type -> count")
    contrib_ops: list[str] = Field(default_factory=list, description="com.microsoft ops used")


class Replay(BaseModel):
    """A fixed prompt's greedy tokens and perplexity window, for a target to replay
    (``runtimes/check/target_card.py``)."""

    model_config = _OPEN
    prompt: str | None = Field(default=None, description="the prompt text")
    prompt_ids: list[int] = Field(description="its token ids")
    new_tokens: int = Field(ge=0, description="greedy tokens generated")
    window_ids: list[int] = Field(default_factory=list, description="perplexity window ids")
    tokens: list[int] = Field(description="this machine's greedy tokens")
    perplexity: float | None = Field(default=None, description="this machine's window perplexity")
    reference_perplexity: float | None = Field(default=None, description="the reference's")
    machine: str | None = Field(default=None, description="where the record was made")
    onnxruntime: str | None = Field(default=None, description="runtime version used")


#: A static-shape card's keys before issue 13 -> its ``greedy`` keys (the ONNX card's).
_OLD_STATIC_GREEDY = {"greedy_agreement": "top1_agreement",
                      "first_divergence": "first_divergence", "prompts": "prompts",
                      "new_tokens": "new_tokens"}


def _static_card_aliases(doc: Any) -> Any:
    """A card written by a static-shape export before issue 13 (``tokens``,
    ``greedy_agreement``, ``first_divergence``, ``prompts``, ``new_tokens`` at its top level)
    in the ONNX card's form (``eval.tokens``, ``greedy.top1_agreement`` ...); any other value
    as it is. Its ``gate`` stays (the manifest's validator lifts it)."""
    if not isinstance(doc, dict) or "greedy_agreement" not in doc or "greedy" in doc:
        return doc
    doc = dict(doc)
    doc["greedy"] = {new: doc.pop(old) for old, new in _OLD_STATIC_GREEDY.items() if old in doc}
    evaluation = dict(doc.get("eval") or {})
    if "tokens" in doc:
        evaluation.setdefault("tokens", doc.pop("tokens"))
    if "prompt_tokens" in evaluation:
        doc["greedy"]["prompt_tokens"] = evaluation.pop("prompt_tokens")
    doc["eval"] = evaluation
    return doc


class QualityCard(BaseModel):
    """The quality card (``exporter/quality/card.py``); a float export's holds the perplexity."""

    model_config = _OPEN

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        return _static_card_aliases(data)
    perplexity: float | None = Field(default=None, description="perplexity on the eval text")
    eval: dict[str, Any] | None = Field(default=None, description="eval text and windows")
    reference_perplexity: float | None = Field(default=None, description="the reference's")
    ppl_increase_pct: float | None = Field(default=None, description="vs the reference, %")
    kl_mean: float | None = Field(default=None, description="mean KL(reference || this)")
    kl_max_position: float | None = Field(default=None, description="largest per-position KL")
    top1_agreement_eval: float | None = Field(default=None, description="top-1 agreement")
    cosine_mean: float | None = Field(default=None, description="mean cosine of the "
                                      "reference's and this one's logit rows")
    cosine_min: float | None = Field(default=None, description="the least such cosine")
    greedy: dict[str, Any] | None = Field(default=None, description="greedy-decoding figures")
    reference: str | None = Field(default=None, description="what it was compared with")
    seconds: float | None = Field(default=None, description="time the card took")
    replay: Replay | None = Field(default=None, description="the target-replay record")
    notes: list[str] = Field(default_factory=list, description="caveats")


class Gate(BaseModel):
    """The quality gate a quantization was held to."""

    model_config = _OPEN
    max_ppl_increase_pct: float | None = Field(default=None, description="allowed rise, %")
    max_kl_mean: float | None = Field(default=None, description="allowed mean KL(fp32 || this)")
    min_top1_agreement: float | None = Field(default=None, description="least top-1 agreement")
    passed: bool | None = Field(default=None, description="whether it passed")
    auto: bool | None = Field(default=None, description="--auto ladder")
    tried: list[dict[str, Any]] = Field(default_factory=list, description="recipes tried")
    skipped: str | None = Field(default=None, description="why no gate ran (quantized on write: "
                                "no fp32 reference here), with the sizes")


class GGUFExact(BaseModel):
    """A GGUF's quantized tensors written as they are (Q4_0 / Q8_0 -> ``MatMulNBits``)."""

    model_config = _OPEN
    tensors: int = Field(ge=0, description="GGUF tensors whose blocks were kept, not requantized")
    by_type: dict[str, int] = Field(default_factory=dict, description="kept tensors per GGML type")
    names: list[str] = Field(default_factory=list, description="the kept tensors' GGUF names")
    nodes: list[str] = Field(default_factory=list, description="the MatMuls that read them")
    requantized: dict[str, Any] | None = Field(default=None, description="quantized tensors of "
                                               "the file that were quantized again: names, reasons")
    wider_than_recipe: dict[str, int] = Field(
        default_factory=dict, description="MatMuls kept at the file's bits, above the recipe's "
        "(int4 on Q5_0 / Q6_K / Q8_0 blocks: QuantRecipe.keep_source_bits), per precision")
    skipped: str | None = Field(default=None, description="why no block was kept (the recipe "
                                "does not stream)")


class StaticCards(BaseModel):
    """A quantized static-shape export's cards vs its float graphs
    (``exporter/onnx/profile.py``): on CPU, and on the target's emulator where it runs here
    (QNN HTP); the gate read the ``judged_on`` one."""

    model_config = _OPEN
    cpu: QualityCard | None = Field(default=None, description="the card on CPU")
    qnn_htp_emulator: QualityCard | None = Field(default=None, description="the card on the "
                                                 "QNN HTP emulator (--device-card)")
    device_card: dict[str, Any] | None = Field(default=None, description="--device-card: the "
                                               "setting, whether it ran, why not")
    judged_on: str | None = Field(default=None, description="the card the gate read")

    def judged(self) -> QualityCard | None:
        """The card the gate read."""
        return getattr(self, self.judged_on, None) if self.judged_on else self.cpu


class Quantization(BaseModel):
    """What quantization did to the graph (``exporter/quantize``)."""

    model_config = _OPEN
    label: str | None = Field(default=None, description="recipe label (int4-b32, a16w8, ...)")
    recipe: dict[str, Any] | None = Field(default=None, description="the recipe as applied")
    external_data: bool | None = Field(default=None, description="weights in model.onnx.data")
    quality: StaticCards | None = Field(default=None, description="static quantization: the "
                                        "cards vs the float graphs")
    gguf_exact: GGUFExact | None = Field(default=None, description="GGUF source: the tensors "
                                         "whose own blocks were kept (no requantization)")
    float_graph: str | None = Field(default=None, description="slmedge export: 'written' (the "
                                    "fp32 graph was written, verified and quantized) or 'not "
                                    "written (why)': quantized on write from the source")


class StaticInfo(BaseModel):
    """Static-shape prefill / decode graphs (``exporter/onnx/static_shapes.py``)."""

    model_config = _OPEN
    context_length: int = Field(ge=1, description="cached positions of the KV buffers")
    prefill_chunk: int = Field(ge=1, description="tokens per prefill call")
    prefill_file: str = Field(description="the prefill graph")
    decode_file: str = Field(description="the decode graph")
    weights_file: str | None = Field(default=None, description="the shared weights file")
    mask_inputs: dict[str, int | None] = Field(default_factory=dict,
                                               description="bias input -> sliding window")
    weights_bytes: int | None = Field(default=None, description="bytes of weights")
    io: dict[str, Any] | None = Field(default=None, description="bundles: each graph's io")


class TfliteInfo(BaseModel):
    """A TFLite graph (``exporter/tflite/convert.py``) and its parity fixture."""

    model_config = _OPEN
    signatures: dict[str, Any] = Field(default_factory=dict, description="name -> io")
    context_length: int = Field(ge=1, description="KV cache length")
    prefill_chunks: list[int] = Field(default_factory=list, description="prefill sizes")
    kv_shape: list[int] = Field(default_factory=list, description="shape of one KV buffer")
    kv_dtype: str = Field(default="float32", description="dtype of the KV buffers")
    prefill_logits: str = Field(default="all", description="prefill returns every position's "
                                "logits ('all') or the last one's")
    quantization: dict[str, Any] | None = Field(default=None, description="recipe applied")
    parity_fixture: dict[str, Any] | None = Field(default=None, description="top-k logits "
                                                  "recorded at export")
    fixture_atol: float | None = Field(default=None, description="fixture tolerance")
    versions: dict[str, Any] | None = Field(default=None, description="converter stack")


class OrtFormat(BaseModel):
    """``.ort`` files written beside the graphs (profile exports)."""

    model_config = _OPEN
    files: list[str] = Field(default_factory=list, description="the .ort files")
    required_operators_config: str | None = Field(default=None, description="op config file")
    graphs: dict[str, Any] | None = Field(default=None, description="bundles: per .ort facts")


class ProfileRecord(BaseModel):
    """The device profile an artifact or bundle was made for (its full dump)."""

    model_config = _OPEN
    name: str = Field(description="profile name")


class Parity(BaseModel):
    """The export's parity gate: the graph's logits vs PyTorch (or why it was skipped)."""

    model_config = _OPEN
    max_abs_diff: float | None = Field(default=None, description="largest logit difference")
    atol: float | None = Field(default=None, description="allowed difference")
    passed: bool | None = Field(default=None, description="None when skipped")
    skipped: str | None = Field(default=None, description="why it was not compared")
    argmax_agree: bool | float | None = Field(default=None, description="every compared "
                                              "position's argmax agrees (artifacts before the "
                                              "shared comparison: TFLite gave the fraction)")
    argmax_agreement: float | None = Field(default=None, description="fraction of compared "
                                           "positions whose argmax agrees")
    logit_range: float | None = Field(default=None, description="max - min of the "
                                      "reference logits")
    tolerance: str | None = Field(default=None, description="which part of the rule "
                                  "(atol + rtol x scale, floor, quantization steps) set atol")
    prefill_tokens: int | None = Field(default=None, description="prompt tokens compared")
    decode_steps: int | None = Field(default=None, description="decode steps compared")

    def summary(self) -> str:
        """One phrase for the CLI."""
        if self.skipped or self.max_abs_diff is None:
            return "parity skipped (see the manifest)"
        return f"parity max |diff| {self.max_abs_diff:.2e} <= {self.atol:.0e}"


class Verification(BaseModel):
    """Checks made at export time."""

    model_config = _OPEN
    parity: Parity | None = Field(default=None, description="parity vs PyTorch")
    tokenizer: dict[str, Any] | None = Field(default=None, description="tokenizer checks")


class DerivedFrom(BaseModel):
    """The artifact a quantized one was made from (``slmedge quantize``)."""

    model_config = _OPEN
    artifact: str = Field(description="path of the source artifact")
    manifest_sha256: str | None = Field(default=None, description="its manifest's sha256")
    model_sha256: str | None = Field(default=None, description="its model file's sha256")
    recipe: Recipe | None = Field(default=None, description="its recipe")
    quality: QualityCard | None = Field(default=None, description="its quality card")


class _Common(BaseModel):
    """Keys artifact and bundle manifests share."""

    model_config = _OPEN

    @model_validator(mode="before")
    @classmethod
    def _gate_in_the_card(cls, data: Any) -> Any:
        """A gate written inside the card before issue 13 (a float static export's
        ``quality.gate: {max_ppl_increase, passed}``, a TFLite export's
        ``{max_ppl_increase_pct, passed}``) as the manifest's ``gate``; a bundle of such an
        artifact carried it in its card too."""
        if (not isinstance(data, dict) or "gate" in data
                or not isinstance(data.get("quality"), dict)):
            return data
        old = data["quality"].get("gate")
        limit = old.get("max_ppl_increase_pct", old.get("max_ppl_increase")) \
            if isinstance(old, dict) else None
        if limit is None:
            return data
        quality = {k: v for k, v in data["quality"].items() if k != "gate"}
        return {**data, "quality": quality,
                "gate": {"max_ppl_increase_pct": limit, "passed": old.get("passed")}}

    schema_version: int | str = Field(description="major version (int) or 'MAJOR.MINOR'")
    created_at: str | None = Field(default=None, description="UTC time written, ISO 8601")
    command: str | None = Field(default=None, description="the command that wrote it")
    format: str = Field(default="onnx", description="onnx, onnx-static or tflite")
    model_file: str = Field(default="model.onnx", description="the main model file")
    architecture: Architecture | None = Field(default=None, description="KV cache facts")
    recipe: Recipe | None = Field(default=None, description="how the graph was made")
    static: StaticInfo | None = Field(default=None, description="static-shape graphs")
    tflite: TfliteInfo | None = Field(default=None, description="TFLite graph")
    ort_format: OrtFormat | None = Field(default=None, description=".ort files")
    profile: ProfileRecord | None = Field(default=None, description="the device profile")
    quality: QualityCard | None = Field(default=None, description="the quality card")
    quantization: Quantization | None = Field(default=None, description="quantization report")
    stop_token_ids: list[int] | int | None = Field(default=None, description="EOS ids")
    files: dict[str, FileEntry] = Field(description="every file but the manifest")

    def model_files(self) -> list[str]:
        """Files whose role is ``model`` (graphs and weights)."""
        return [rel for rel, f in self.files.items() if f.role == "model"]

    def model_bytes(self) -> int:
        """Bytes of the model files."""
        return sum(self.files[rel].size for rel in self.model_files())

    def graph_files(self) -> list[str]:
        """The ONNX graphs: prefill + decode of a static export, else the model file; none
        for TFLite."""
        if self.format == "tflite":
            return []
        if self.static:
            return [self.static.prefill_file, self.static.decode_file]
        return [self.model_file]

    def card(self) -> QualityCard | StaticCards | None:
        """The quality card: ``quality``, or a quantized static export's
        ``quantization.quality`` (vs its float graphs)."""
        return self.quality or (self.quantization.quality if self.quantization else None)

    def to_json(self) -> dict:
        """The JSON document (unknown keys kept; keys never written stay absent)."""
        return self.model_dump(mode="json", exclude_unset=True)


class Manifest(_Common):
    """An artifact's ``manifest.json`` (``slmedge export`` / ``quantize``)."""

    kind: str | None = Field(default=None, description="absent in an artifact's manifest "
                             "(a bundle's says 'bundle')")
    source: SourceInfo | None = Field(default=None, description="where the model came from")
    derived_from: DerivedFrom | None = Field(default=None, description="quantize's source")
    architecture: Architecture = Field(description="KV cache facts")
    recipe: Recipe = Field(description="how the graph was made")
    io: GraphIO | None = Field(default=None, description="inputs / outputs of the main graph")
    onnx: OnnxFacts | dict[str, OnnxFacts] | None = Field(
        default=None, description="facts of the graph; static: {prefill, decode}")
    fusion: dict[str, Any] | None = Field(default=None, description="fusion counts")
    gate: Gate | None = Field(default=None, description="quality gate of a quantization")
    verification: Verification | None = Field(default=None, description="export-time checks")
    placement: dict[str, Any] | None = Field(default=None, description="placement check")
    timings_s: dict[str, Any] | None = Field(default=None, description="seconds per step")
    versions: dict[str, Any] = Field(default_factory=dict, description="package -> version")


class BundleSource(BaseModel):
    model_config = _OPEN
    path: str = Field(description="the artifact bundled")
    manifest_sha256: str | None = Field(default=None, description="its manifest's sha256")


class FirstStep(BaseModel):
    model_config = _OPEN
    top_ids: list[int] = Field(description="the top token ids of the first step")
    top_logits: list[float] = Field(description="their logits")


class BundleParity(BaseModel):
    """The reference ``slmedge verify`` replays (recorded at bundle time, 1 thread, CPU)."""

    model_config = _OPEN
    prompt: str | None = Field(default=None, description="the prompt text")
    prompt_ids: list[int] = Field(description="its token ids")
    greedy_tokens: list[int] = Field(description="greedy tokens recorded")
    first_step: FirstStep = Field(description="first-step top logits recorded")
    atol: float = Field(ge=0, description="allowed first-step logit difference")
    runtime: str | None = Field(default=None, description="runtime that recorded it")


class BundleManifest(_Common):
    """A bundle's ``manifest.json`` (``slmedge bundle``; ``kind: bundle``)."""

    kind: str = Field(description="'bundle'")
    source: BundleSource | None = Field(default=None, description="the artifact bundled")
    model_format: dict[str, Any] | None = Field(default=None, description="onnx or ort, why")
    onnx: dict[str, dict[str, Any]] = Field(default_factory=dict,
                                            description="per graph: opset, IR, contrib ops")
    onnxruntime: dict[str, Any] | None = Field(default=None, description="minimum ORT, why")
    litert: dict[str, Any] | None = Field(default=None, description="LiteRT versions")
    source_verification: Verification | None = Field(default=None, description="the "
                                                     "artifact's export-time checks")
    gate: Gate | None = Field(default=None, description="the artifact's quality gate and "
                              "whether it passed (its manifest's gate)")
    parity: BundleParity | None = Field(default=None, description="replayed by verify")
    genai_config: str | None = Field(default=None, description="genai_config.json or None")
    genai_config_reason: str | None = Field(default=None, description="why (not)")
    last_bench: dict[str, Any] | None = Field(default=None, description="last bench summary")
    notes: list[str] = Field(default_factory=list, description="softer mismatches")


def validate_manifest(doc: dict, source: str | Path = "manifest",
                      root: Path | None = None) -> Manifest | BundleManifest:
    """Check the version, then validate ``doc``: a :class:`BundleManifest` for
    ``kind: bundle``, else a :class:`Manifest`. Raises :class:`UsageError` (exit 2) naming
    the file, the fields at fault and the command that writes the artifact again."""
    root = Path(root) if root is not None else Path(str(source)).parent
    check_schema_version(doc, source, root)
    model = BundleManifest if doc.get("kind") == "bundle" else Manifest
    try:
        return model.model_validate(doc)
    except ValidationError as e:
        raise UsageError(
            f"{source} is not a valid slmedge {'bundle ' if model is BundleManifest else ''}"
            f"manifest (schema version {doc.get('schema_version')}): "
            f"{validation_problems(e, limit=5)}; write it again: {reexport_command(doc, root)}") \
            from None


def load_manifest(path: str | Path) -> Manifest | BundleManifest:
    """Read and validate the manifest of an artifact or bundle directory (or the
    ``manifest.json`` file itself)."""
    p = Path(path)
    mpath = p / MANIFEST_NAME if p.is_dir() else p
    return validate_manifest(read_manifest_json(mpath), mpath, mpath.parent)


def json_schema() -> dict:
    """The JSON Schema of the artifact manifest."""
    return Manifest.model_json_schema()


__all__ = ["Manifest", "BundleManifest", "load_manifest", "validate_manifest",
           "MANIFEST_SCHEMA_VERSION", "BUNDLE_SCHEMA_VERSION"]

if __name__ == "__main__":
    print(json.dumps(json_schema(), indent=2))
