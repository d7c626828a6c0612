"""``slmedge export --profile NAME``: the device profile's recipe shapes the export.

- dynamic-shape profiles (CPU): the regular export with the profile's precision and
  quantization (``--dtype`` / ``--quant`` given explicitly win);
- static-shape profiles (NNAPI, QNN HTP, CoreML): prefill + decode graphs over a fixed
  context window (:mod:`.static_shapes`), parity-checked against PyTorch;
- ``ort`` in the profile's formats: ``.ort`` files plus ``required_operators.config`` for a
  reduced ONNX Runtime mobile build;
- the manifest records the profile and the placement check on its target
  (``runtimes.check.placement``: QNN HTP emulator session, ORT's mobile usability checker, or
  the CPU kernels).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from slmedge.device_profiles import load_profile
from slmedge.device_profiles.schema import (
    QDQ_SCHEMES, ArtifactFormat, DeviceProfile, QuantScheme, ShapePolicy,
)
from slmedge.runtimes.errors import QualityGateFailed, SlmEdgeError, UsageError

from .export import export_onnx
from slmedge.exporter.manifest import onnx_facts
from slmedge.exporter.skeleton import ExportSteps, Extra, run_steps
from slmedge.exporter.sources.load import load_source
from .static_shapes import DECODE_FILE, PREFILL_FILE, WEIGHTS_FILE, export_static

ORT_OPS_CONFIG = "required_operators.config"
#: a16w8 static graphs are exported at this opset: 16-bit Q/DQ needs it, and the quantizer's
#: own upgrade (onnx's version converter) stops at ORT's SimplifiedLayerNormalization
#: ("Op has no registered schema"), which recipe.fuse_norms puts in the graph.
A16W8_OPSET = 21


def profile_fields(config, profile: DeviceProfile) -> dict:
    """What the profile sets on the export config, unless the user gave it explicitly."""
    explicit = config.model_fields_set
    update: dict = {"profile": None}
    if "dtype" not in explicit:
        update["dtype"] = profile.recipe.precision.value
    level = profile.recipe.int4_accuracy_level
    if "quant" not in explicit:
        scheme = profile.recipe.quantization.value
        update["quant"] = None if scheme == "none" else {"scheme": scheme}
        if scheme == "int4" and level is not None:
            update["quant"]["accuracy_level"] = level
    elif (level is not None and config.quant is not None
          and config.quant.scheme.value == "int4"
          and "accuracy_level" not in config.quant.model_fields_set):
        # `--quant int4` with the profile: the profile's level, unless --accuracy-level is given
        update["quant"] = config.quant.model_copy(update={"accuracy_level": level})
    return update


def _derived(config, profile: DeviceProfile):
    from slmedge.exporter.quantize.recipe import QuantRecipe

    update = profile_fields(config, profile)
    if isinstance(update.get("quant"), dict):
        update["quant"] = QuantRecipe(**update["quant"])
    if "dtype" in update:
        update["dtype"] = type(config.dtype)(update["dtype"])
    return config.model_copy(update=update)


def run_profile_export(config, progress=None, command: str | None = None) -> dict:
    """Export for ``config.profile``; returns the manifest. ``command`` is recorded in the
    manifest, as the ONNX flow records it."""
    say = progress or (lambda _m: None)
    profile = load_profile(config.profile)
    derived = _derived(config, profile)
    say(f"profile {profile.name}: {profile.shapes.policy.value} shapes, "
        f"{derived.dtype.value}, quantization {derived.quant.scheme.value if derived.quant else 'none'}")
    extras = (ProfileExtra(profile),)
    if profile.shapes.policy is ShapePolicy.static:
        if derived.max_context is not None:
            raise UsageError(
                f"--max-context {derived.max_context} applies to dynamic-shape exports; profile "
                f"{profile.name} has static shapes whose context is its shapes.context_length "
                f"({profile.shapes.context_length}). Leave --max-context out, or copy the profile "
                "with another context_length")
        return run_steps(StaticSteps(derived, profile), derived.output, derived.overwrite, say,
                         command=command, extras=extras)
    # pipeline.run_export has quieted the libraries
    return export_onnx(derived, progress, command, extras=extras)


class ProfileExtra(Extra):
    """A device profile's steps after the flow's own: ``.ort`` files (``ort`` in the profile's
    formats), the profile itself, and the placement check on its target."""

    def __init__(self, profile: DeviceProfile):
        self.profile = profile

    def files(self, stage: Path, fields: dict, say) -> tuple[dict, set[str]]:
        profile = self.profile
        more: dict = {}
        if ArtifactFormat.ort in profile.artifact.formats:
            static = fields.get("static")
            graphs = ([static["prefill_file"], static["decode_file"]] if static
                      else [fields["model_file"]])
            more["ort_format"] = convert_to_ort(
                stage, graphs, say,
                runtime_style=profile.accelerator in ("NnapiExecutionProvider",
                                                      "CoreMLExecutionProvider"),
                arm=profile.device.arch.value != "x86_64")
        more["profile"] = {"name": profile.name, **profile.model_dump(mode="json")}
        return more, set(more.get("ort_format", {}).get("files", []))

    def check(self, stage: Path, manifest: dict, final: Path, say) -> dict:
        from slmedge.runtimes.artifact import Artifact
        from slmedge.runtimes.check.placement import check_artifact

        profile = self.profile
        say(f"placement check on {profile.accelerator or profile.runtime.providers[0].name}")
        # the .ort files hold the graphs' weights again: Artifact.file_size_mb counts them once
        artifact = Artifact(root=stage, manifest=manifest,
                            model_path=stage / manifest["model_file"], files=manifest["files"])
        try:
            placement = check_artifact(artifact, profile).to_dict(max_rows=50)
        except SlmEdgeError as e:  # the artifact is fine; say why its placement is unknown
            placement = {"error": str(e)}
        return {"placement": _at_final_path(placement, stage, final)}


def _at_final_path(report: dict, stage: Path, final: Path) -> dict:
    """The placement report with the staging directory's path (``.NAME.partial-PID``, gone
    once renamed) written as the output's: ONNX Runtime's messages quote the graph's path."""
    return json.loads(json.dumps(report).replace(json.dumps(str(stage))[1:-1],
                                                 json.dumps(str(final))[1:-1]))


def convert_to_ort(root: Path, graphs: list[str], say, *, runtime_style: bool = False,
                   arm: bool = True) -> dict:
    """``.ort`` beside each graph and one ``required_operators.config`` for all of them
    (ONNX Runtime's own converter). ``runtime_style``: the 'Runtime' optimization style ORT
    recommends for NNAPI / CoreML (optimizations replayed on the device once it knows which
    nodes the provider takes); else 'Fixed'. ``arm``: bake in ARM-specific optimizations."""
    style = "Runtime" if runtime_style else "Fixed"
    say(f"converting to ORT format ({style} optimizations) with a required-operators config")
    out = root / ".ort-work"
    out.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(root),
           "--output_dir", str(out), "--optimization_style", style,
           "--target_platform", "arm" if arm else "amd64"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    try:
        if done.returncode != 0:
            last = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
            raise SlmEdgeError(f"ORT format conversion failed: {last[-1][:300]}")
        files = []
        for graph in graphs:
            stem = Path(graph).stem
            made = sorted(out.glob(f"{stem}*.ort"))
            if not made:
                raise SlmEdgeError(f"ORT format conversion wrote no .ort for {graph}")
            made[0].replace(root / f"{stem}.ort")
            files.append(f"{stem}.ort")
        configs = sorted(out.glob("required_operators*.config"))
        if configs:
            configs[0].replace(root / ORT_OPS_CONFIG)
    finally:
        for p in sorted(out.rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        out.rmdir()
    return {"files": files, "required_operators_config": ORT_OPS_CONFIG,
            "optimization_style": style}


# -- static shapes ---------------------------------------------------------------------------


class StaticSteps(ExportSteps):
    """The static-shape flow's steps (:func:`.skeleton.run_steps` runs them): prefill and
    decode graphs over the profile's context window, gated against PyTorch, then QDQ
    (``_quantize_static``) or the float graphs' card (``_float_quality``)."""

    def __init__(self, config, profile: DeviceProfile):
        self.config, self.profile = config, profile
        self.card_phase = "card" if config.quant is None else "quantize_and_card"
        self.opset = config.opset
        if config.quant is not None and config.quant.scheme is QuantScheme.a16w8:
            self.opset = max(self.opset, A16W8_OPSET)

    def check(self) -> None:
        config = self.config
        _eval_text(config)  # a missing --eval-text fails now, not after the export
        from slmedge.exporter.quantize.pipeline import check_quant_texts

        check_quant_texts(config.quant, config.quality)  # and a missing --calibration (a16w8)
        if config.quant is not None and config.quant.scheme not in QDQ_SCHEMES:
            raise UsageError(
                f"quantization {config.quant.scheme.value} uses CPU-only contrib ops; a "
                "static-shape (NPU) export takes a16w8, int8-static or none")

    def load(self, say):
        return load_source(self.config.model, dtype=self.config.dtype.value, progress=say)

    def convert(self, stage: Path, loaded, say) -> dict[str, float]:
        config, shapes, spec = self.config, self.profile.shapes, loaded.spec
        layers = spec.kv_layout(loaded.model.config)[0]
        fuse_norms = self.profile.recipe.fuse_norms
        say(f"exporting {spec.family} ({layers} layers) as static graphs: context "
            f"{shapes.context_length}, prefill chunk {shapes.prefill_chunk}, "
            f"{config.dtype.value}, opset {self.opset}"
            + (", RMSNorms fused (recipe.fuse_norms)" if fuse_norms else ""))
        self.info = export_static(loaded.model, spec, stage, context_length=shapes.context_length,
                                  prefill_chunk=shapes.prefill_chunk, opset=self.opset,
                                  fuse_norms=fuse_norms, norm_weight_apart=config.quant is not None)
        return {"export": round(self.info.seconds, 2)}

    def parity(self, stage: Path, loaded, say) -> dict:
        config, spec = self.config, loaded.spec
        say("checking parity of the prefill and decode graphs with PyTorch")
        # As the dynamic gate: an explicit --parity-atol is the whole tolerance, else the
        # architecture's atol plus its relative part (logit scale grows with the model).
        rtol = 0.0 if config.parity_atol else getattr(spec, "parity_rtol", 0.0)
        parity = static_parity(loaded.model, stage, self.info.to_manifest(),
                               atol=config.parity_atol or spec.parity_atol, rtol=rtol,
                               fp16=config.dtype.value == "fp16")
        if not parity["passed"]:
            raise QualityGateFailed(
                f"parity gate failed: static graphs differ from PyTorch by "
                f"{parity['max_abs_diff']:.3g} (allowed {parity['atol']:.3g}); nothing was written",
                parity)
        return parity

    def card(self, stage: Path, loaded, parity: dict, say) -> None:
        config = self.config
        self.quant = self.quality = self.gate = None
        self.static_doc = self.info.to_manifest()
        if config.quant is not None:
            self.quant = _quantize_static(stage, self.info.to_manifest(), config, self.profile,
                                          say)
            # the QDQ graphs rewrote model.onnx.data: the float export's byte counts are stale
            self.static_doc.update(
                weights_bytes=self.quant["weights_bytes"],
                weights_bytes_saved_by_sharing=self.quant["weights_bytes_saved_by_sharing"])
        else:
            self.quality, self.gate = _float_quality(stage, self.info.to_manifest(),
                                                     loaded.model, config, say)

    def fields(self, stage: Path, loaded) -> tuple[dict, set[str]]:
        config, quant, quality, info = self.config, self.quant, self.quality, self.info
        return {
            "format": "onnx-static",
            "model_file": DECODE_FILE,
            "recipe": {"dtype": config.dtype.value, "opset": self.opset,
                       "external_data": True, "shapes": "static",
                       "quant": quant["label"] if quant else None,
                       "fuse_norms": self.profile.recipe.fuse_norms,
                       "device_card": _device_card(config)},
            **({"quantization": quant} if quant else {"quality": quality}),
            **({"gate": self.gate} if self.gate else {}),
            "static": self.static_doc,
            "io": {"inputs": info.input_names["decode"], "outputs": info.output_names},
            "onnx": {"prefill": onnx_facts(stage / PREFILL_FILE),
                     "decode": onnx_facts(stage / DECODE_FILE)},
            "verification": {"device_card": quant["quality"]["device_card"] if quant else {
                "setting": _device_card(config), "ran": False,
                "why": _float_card_why(quality)}},
        }, {PREFILL_FILE, DECODE_FILE, WEIGHTS_FILE}


#: Gate for quantized static graphs: mean cosine of the logits vs the float graphs, on the
#: target when it can be run here (QNN HTP emulator), else on CPU.
MIN_QDQ_COSINE = 0.99
#: The reference of a QDQ static export's cards.
FLOAT_GRAPHS_REFERENCE = "the float static graphs on CPU"


def _device_card(config) -> str:
    return config.device_card.value if config.device_card is not None else "full"


#: ``--device-card`` -> static_quality arguments, given the prefill chunk. On the HTP emulator
#: SmolLM2-135M a16w8 took ~6.5 min per 64-token chunk and ~80 s per decode step: full is
#: about an hour, short one chunk plus one prompt.
DEVICE_CARDS = {
    "full": lambda chunk: {"window": 256, "prompts": 3, "prompt_tokens": 16, "new_tokens": 16},
    "short": lambda chunk: {"window": chunk, "prompts": 1, "prompt_tokens": min(16, chunk),
                            "new_tokens": 4},
}


def _quantize_static(stage: Path, static: dict, config, profile: DeviceProfile, say) -> dict:
    """QDQ the static graphs (issue 3's quantizer), then a quality card vs the float graphs on
    CPU and, for a QNN profile with onnxruntime-qnn here, on the HTP emulator; gate on it."""
    import shutil

    from slmedge.runtimes.sessions.providers import availability
    from slmedge.runtimes.sessions.static_decoder import StaticDecoder
    from slmedge.runtimes.tokenizer import TextTokenizer

    from slmedge.exporter.quantize.calibration import calibration_text
    from .static_shapes_qdq import quantize_static_graphs, static_quality

    tokenizer = TextTokenizer(stage)
    calib = tokenizer.encode(calibration_text(config.quant.calibration).read_text(
        encoding="utf-8", errors="replace")[:200_000])
    reference = stage.parent / (stage.name + ".float")
    shutil.copytree(stage, reference)
    try:
        report = quantize_static_graphs(stage, static, config.quant, calib,
                                        float_ops=list(profile.recipe.float_ops), say=say)
        # no evaluation text here: score the calibration text
        text_path = _eval_text(config) or calibration_text(config.quant.calibration)
        ids = tokenizer.encode(text_path.read_text(encoding="utf-8", errors="replace")[:50_000])
        ref = StaticDecoder(reference, static)
        say("quality card of the QDQ graphs vs the float graphs (CPU)")
        card = static_quality(ref, StaticDecoder(stage, static), ids, window=256)
        card.reference = FLOAT_GRAPHS_REFERENCE
        cards = {"cpu": card.to_dict()}
        setting = _device_card(config)
        device = {"setting": setting, "ran": False}
        if profile.accelerator != "QNNExecutionProvider":
            device["why"] = (f"no card runs on {profile.accelerator} here (only the QNN HTP "
                             "has an emulator on this platform)")
        elif (reason := availability("QNNExecutionProvider")) is not None:
            device["why"] = reason
        elif setting == "off":
            device["why"] = "--device-card off: the CPU card gates"
        else:
            shape = DEVICE_CARDS[setting](ref.chunk)
            say(f"quality card on the QNN HTP emulator ({setting}: {shape['window']}-token "
                f"window, {shape['prompts']} prompt(s) x {shape['new_tokens']} tokens)")
            htp = StaticDecoder(stage, static, providers=profile.provider_specs(),
                                allow_cpu_fallback=True)
            card = static_quality(ref, htp, ids, **shape)
            card.reference = FLOAT_GRAPHS_REFERENCE
            cards["qnn_htp_emulator"] = card.to_dict()
            cards["qnn_htp_emulator"]["nodes_by_provider"] = {
                k: v.nodes_by_provider for k, v in htp.placement.items() if v is not None}
            device["ran"] = True
    finally:
        shutil.rmtree(reference, ignore_errors=True)
    report["quality"] = {**cards, "device_card": device}
    judged = "qnn_htp_emulator" if "qnn_htp_emulator" in cards else "cpu"
    report["quality"]["judged_on"] = judged
    if cards[judged]["cosine_mean"] < MIN_QDQ_COSINE:
        raise QualityGateFailed(
            f"quality gate failed: {report['label']} static graphs diverge from the float graphs "
            f"on {judged} (mean logit cosine {cards[judged]['cosine_mean']:.3f} < "
            f"{MIN_QDQ_COSINE}, greedy agreement {cards[judged]['greedy']['top1_agreement']:.0%}); "
            "nothing was written. Export without quantization (a profile that extends this one "
            "with recipe.quantization none), or keep more op types in recipe.float_ops", report)
    return report


def _eval_text(config) -> Path | None:
    """``--eval-text`` (a missing file is a usage error, as for dynamic exports), else the
    packaged eval_mansfield_park.txt; None when that is not here."""
    return config.quality.settings().text_path()


def _float_quality(stage: Path, static: dict, model, config, say) -> tuple[dict, dict | None]:
    """Quality card of the float static graphs vs PyTorch in fp32, both on CPU (the QDQ
    graphs' card, ``static_quality``: the ONNX flow's keys) and its ``gate`` (the manifest's
    top-level gate, as a quantized ONNX export's); gate on ``--max-ppl-increase``.

    Parity compares the first chunk + 5 positions; this card reads the whole window (256
    tokens at most) and generates through the decode graph. An fp16 export loaded the model
    in fp16: the reference is an fp32 copy of those weights (a bf16 checkpoint's values fit
    fp16's mantissa; an fp32 one's were rounded)."""
    import copy
    import hashlib

    import torch

    from slmedge.runtimes.sessions.static_decoder import StaticDecoder
    from slmedge.runtimes.tokenizer import TextTokenizer

    from slmedge.exporter.quality.parity import TorchDecoder
    from slmedge.exporter.quantize.calibration import DEFAULT_CALIBRATION_TEXT
    from .static_shapes_qdq import static_quality

    t0 = time.perf_counter()
    text_path = _eval_text(config) or (DEFAULT_CALIBRATION_TEXT
                                       if DEFAULT_CALIBRATION_TEXT.is_file() else None)
    if text_path is None:
        return {"skipped": "no evaluation text found; pass --eval-text FILE"}, None
    text = text_path.read_text(encoding="utf-8", errors="replace")  # as _quantize_static
    ids = TextTokenizer(stage).encode(text[:50_000])
    candidate = StaticDecoder(stage, static)
    reference = "PyTorch fp32 on CPU"
    loaded = next(model.parameters()).dtype
    if loaded != torch.float32:
        model = copy.deepcopy(model).float()
        reference += (f" (an fp32 copy of the {str(loaded).removeprefix('torch.')} weights "
                      "loaded for this export)")
    prompt_tokens = min(16, candidate.context // 2)
    new_tokens = min(16, candidate.context - prompt_tokens)
    say(f"quality card of the static graphs vs {reference}: {min(256, candidate.context)}-token "
        f"window, 3 greedy prompts x {new_tokens} tokens")
    card = static_quality(TorchDecoder(model, candidate.context), candidate, ids, window=256,
                          prompts=3, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                          eval_info={"text": str(text_path), "text_sha256": hashlib.sha256(
                              text_path.read_bytes()).hexdigest()})
    card.reference = reference
    card.seconds = round(time.perf_counter() - t0, 2)
    limit = config.quality.max_ppl_increase
    gate = {"max_ppl_increase_pct": limit, "passed": card.ppl_increase_pct <= limit}
    doc = {**card.to_dict(),
           "candidate": "the static prefill / decode graphs on CPU (ONNX Runtime)"}
    say(f"quality card: {card.summary()}, {card.seconds:.1f} s")
    if not gate["passed"]:
        raise QualityGateFailed(
            f"quality gate failed: the static graphs' perplexity is {card.perplexity:.3f}, "
            f"{card.ppl_increase_pct:+.2f}% over PyTorch's {card.reference_perplexity:.3f} "
            f"on {card.eval['tokens']} tokens (allowed +{limit:g}%); nothing was written. Parity "
            "compares the first prefill chunk and a few decode steps only: look at later "
            "positions of the window (cache slots, attention bias); --max-ppl-increase PCT "
            "raises the limit", {**doc, "gate": gate})
    return doc, gate


def _float_card_why(quality: dict) -> str:
    if "skipped" in quality:
        return f"no quantization and no quality card: {quality['skipped']}"
    return ("no quantization: the float graphs' quality card (manifest quality) is vs PyTorch "
            "fp32 on CPU; no card runs on the accelerator")


def static_parity(model, root: Path, static: dict, *, atol: float, rtol: float = 0.0,
                  fp16: bool = False,
                  decode_steps: int = 3, seed: int = 0) -> dict:
    """PyTorch logits of one sequence vs the static graphs: a prompt of one chunk plus two
    tokens (two prefill calls, the second padded) then ``decode_steps`` decode calls
    (:func:`.compare.compare_decoders`, the ONNX gate's comparison and tolerance)."""
    from slmedge.runtimes.sessions.static_decoder import StaticDecoder

    from slmedge.exporter.quality.compare import Tolerance, compare_decoders
    from slmedge.exporter.quality.parity import TorchDecoder

    chunk = int(static["prefill_chunk"])
    n_prompt = min(chunk + 2, int(static["context_length"]) - decode_steps)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, model.config.vocab_size, n_prompt + decode_steps).tolist()
    # the reference: one forward over the whole sequence, split as the candidate's steps
    ref = TorchDecoder(model).logits(ids)
    ref = np.split(ref, range(n_prompt, len(ids)))
    return compare_decoders(StaticDecoder(root, static), ref, ids[:n_prompt], ids[n_prompt:],
                            Tolerance.for_dtype(atol, rtol, fp16=fp16)).to_dict()
