"""``slmedge export --format tflite``: source -> TFLite (prefill/decode signatures, static KV
cache) -> optional ai-edge-quantizer recipe -> parity gate -> quality card -> manifest.

Same staging and manifest as the ONNX path: everything is written into a staging
directory that replaces ``--output`` only when every step, the gates included, passed.
Needs the ``[tflite]`` extra (litert-torch, tensorflow-cpu, ai-edge-litert), which lives in
its own venv (``tools/setup_tflite.sh``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np

from slmedge.device_profiles.schema import QuantScheme
from slmedge.runtimes.errors import QualityGateFailed
from slmedge.runtimes.sessions.litert_decoder import LiteRTDecoder, parity_fixture
from slmedge.runtimes.tokenizer import TextTokenizer

from slmedge.exporter.quality.compare import ParityResult, Tolerance, compare_decoders
from slmedge.exporter.quality.parity import torch_step_logits
from slmedge.exporter.skeleton import ExportSteps, run_steps
from slmedge.exporter.sources.load import classify, load_source, read_model_type
from slmedge.exporter.tflite.convert import TfliteGraphInfo, check_family, convert_decoder
from slmedge.exporter.tflite.options import TfliteExportConfig, require_tflite_extra
from slmedge.exporter.tflite.quantize import quantize_tflite

MODEL_FILE = "model.tflite"
REFERENCE_FILE = ".reference-fp32.tflite"  # the fp32 graph, removed before the manifest
Progress = Callable[[str], None]
_STACK = (
    "litert-torch",
    "ai-edge-litert",
    "ai-edge-quantizer",
    "litert-converter",
    "tensorflow-cpu",
    "torchao",
)
#: fp32 gate relative to the logits' scale: XNNPACK sums in another order than PyTorch, so
#: a real model's large logits differ more than a tiny one's (SmolLM2-135M, |logits| ~ 20:
#: 9.5e-4 max, 5e-5 of the scale; tiny test models stay under 2e-6 and keep the family's atol).
FP32_RTOL_OF_SCALE = 1e-4
#: Weight bits of each scheme: the size of one quantization step of the logits (see tolerance).
WEIGHT_BITS = {
    QuantScheme.fp16: 11,
    QuantScheme.int8_weight: 8,
    QuantScheme.int8_dynamic: 8,
    QuantScheme.int8_static: 8,
    QuantScheme.int4_block32: 4,
}


def parity_inputs(
    vocab: int, context_length: int, chunks: list[int], decode_steps: int = 3, seed: int = 0
) -> tuple[list[int], list[int]]:
    """A prompt that spans a full largest chunk plus a padded tail, then decode tokens."""
    rng = np.random.default_rng(seed)
    length = chunks[-1] + 3 if chunks[-1] + 3 + decode_steps <= context_length else 8
    return rng.integers(0, vocab, length).tolist(), rng.integers(0, vocab, decode_steps).tolist()


def tolerance(scheme: QuantScheme, fp32_atol: float, steps: float) -> Tolerance:
    """The parity tolerance (:class:`.compare.Tolerance`): the family's fp32 atol with a floor of
    ``FP32_RTOL_OF_SCALE`` of the logit scale, or ``steps`` quantization steps of the reference
    logits' range at the scheme's weight bits (ExecuTorch's tester does the same)."""
    if scheme is QuantScheme.fp32:
        return Tolerance(atol=fp32_atol, scale_floor=FP32_RTOL_OF_SCALE)
    return Tolerance(atol=fp32_atol, quant_bits=WEIGHT_BITS[scheme], quant_steps=steps)


def check_tflite_parity(
    model, decoder: LiteRTDecoder, scheme: QuantScheme, *, atol: float, steps: float, seed: int = 0
) -> ParityResult:
    """PyTorch and LiteRT logits on the same prefill (full chunk + padded tail) and decode steps
    (:func:`.compare.compare_decoders`, the ONNX gate's comparison)."""
    prompt, decode = parity_inputs(
        model.config.vocab_size, decoder.context_length, decoder.prefill_chunks or [8], seed=seed
    )
    return compare_decoders(
        decoder, torch_step_logits(model, prompt, decode), prompt, decode,
        tolerance(scheme, atol, steps),
    )


def _stack_versions() -> dict[str, str]:
    out = {}
    for name in _STACK:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def _quality(
    config: TfliteExportConfig,
    stage: Path,
    candidate: LiteRTDecoder,
    reference: LiteRTDecoder | None,
    say: Progress,
) -> dict:
    """The quality card of the candidate (against the fp32 graph when quantized)."""
    from slmedge.exporter.quality.card import QualitySettings, eval_token_ids, quality_card

    settings = QualitySettings(
        eval_text=config.eval_text,
        eval_tokens=config.eval_tokens,
        window=min(512, candidate.context_length),
        stride=min(256, candidate.context_length // 2),
        # a short static cache (tiny test models) still leaves room for the prompts
        new_tokens=min(config.greedy_tokens, candidate.context_length // 2),
    )
    tokenizer = TextTokenizer(stage)
    found = eval_token_ids(tokenizer, settings)
    if found is None:
        return {"skipped": "no evaluation text found; pass --eval-text FILE"}
    ids, info = found
    prompts = [p for p in (tokenizer.encode(t) for t in settings.prompts) if p]
    room = candidate.context_length - settings.new_tokens
    prompts = [p for p in prompts if len(p) <= room]
    card = quality_card(
        candidate,
        ids,
        reference=reference,
        prompt_ids=prompts if reference is not None else [],
        window=settings.window,
        stride=settings.stride,
        new_tokens=settings.new_tokens,
        eval_info=info,
        progress=say,
    )
    out = card.to_dict()
    if reference is not None:
        out["reference"] = "fp32 TFLite graph of the same export"
    return out


def run_tflite_export(config: TfliteExportConfig, progress: Progress | None = None,
                      command: str | None = None) -> dict:
    """Export, quantize, verify and write a TFLite artifact; returns the manifest.
    ``command`` is recorded in the manifest, as the ONNX flow records it."""
    require_tflite_extra()
    return run_steps(TfliteSteps(config), config.output, config.overwrite, progress,
                     command=command)


class TfliteSteps(ExportSteps):
    """The TFLite flow's steps (:func:`.skeleton.run_steps` runs them): the fp32 flatbuffer
    is gated against PyTorch, then quantized (ai-edge-quantizer), gated again and carded
    against the fp32 graph."""

    def __init__(self, config: TfliteExportConfig):
        self.config = config
        self.scheme = config.quant
        self.card_phase = "card" if self.scheme is QuantScheme.fp32 else "quantize_and_card"

    def check(self) -> None:
        kind, where = classify(self.config.model)
        check_family(read_model_type(kind, where))  # exit 4 before any weight is read

    def load(self, say: Progress):
        loaded = load_source(self.config.model, dtype="fp32", progress=say)
        check_family(loaded.model.config.model_type, loaded.model.config)
        return loaded

    def convert(self, stage: Path, loaded, say: Progress) -> dict[str, float]:
        config, model, spec = self.config, loaded.model, loaded.spec
        layers = spec.kv_layout(model.config)[0]
        sigs = ", ".join(f"prefill_{t}" for t in config.prefill_chunks) + ", decode"
        say(
            f"converting {spec.family} ({layers} layers) to TFLite: {sigs}; "
            f"KV cache {config.context_length} rows"
        )
        if config.from_artifact is not None:
            self.fp32, self.graph = _reuse_fp32(config, loaded.source.to_dict())
            say(f"reusing the fp32 graph of {config.from_artifact}: {sigs}")
        else:
            self.fp32, self.graph = convert_decoder(
                model,
                spec,
                context_length=config.context_length,
                prefill_chunks=config.prefill_chunks,
            )
        self.fp32_path = stage / (MODEL_FILE if self.scheme is QuantScheme.fp32 else REFERENCE_FILE)
        self.fp32_path.write_bytes(self.fp32)
        return {"convert": self.graph.seconds}

    def parity(self, stage: Path, loaded, say: Progress) -> dict:
        """The fp32 graph against PyTorch; the quantized graph's own parity is :meth:`card`'s."""
        config = self.config
        say("checking fp32 parity with PyTorch (LiteRT)")
        self.atol = config.parity_atol or loaded.spec.parity_atol
        self.reference = LiteRTDecoder(self.fp32_path, threads=config.threads)
        parity_fp32 = check_tflite_parity(
            loaded.model, self.reference, QuantScheme.fp32, atol=self.atol, steps=config.quant_steps
        )
        if not parity_fp32.passed:
            raise QualityGateFailed(
                f"parity gate failed: fp32 TFLite logits differ from PyTorch by "
                f"{parity_fp32.max_abs_diff:.3g} (allowed {parity_fp32.atol:.3g}); nothing was "
                "written",
                parity_fp32.to_dict(),
            )
        self.parity_fp32 = parity_fp32
        return parity_fp32.to_dict()

    def card(self, stage: Path, loaded, parity: dict, say: Progress) -> None:
        config, scheme, model = self.config, self.scheme, loaded.model
        self.quant_report = None
        if scheme is QuantScheme.fp32:
            candidate, self.final_parity = self.reference, self.parity_fp32
        else:
            calib_ids: list[int] = []
            if scheme is QuantScheme.int8_static:
                calib_ids = _calibration_ids(stage)
            data, self.quant_report = quantize_tflite(
                self.fp32,
                scheme,
                fp32_path=self.fp32_path,
                calib_ids=calib_ids,
                calib_samples=config.calib_samples,
                threads=config.threads,
                say=say,
            )
            (stage / MODEL_FILE).write_bytes(data)
            candidate = LiteRTDecoder(stage / MODEL_FILE, threads=config.threads)
            say(f"checking {scheme.value} parity with PyTorch")
            self.final_parity = check_tflite_parity(
                model, candidate, scheme, atol=self.atol, steps=config.quant_steps
            )
            # On a real model the largest of ~50k logits moves by more than a few weight steps
            # (SmolLM2-135M int8-dynamic: 18.9 vs 0.71), so with the quality card on, the gate
            # is its perplexity against the fp32 graph, as for ONNX; the steps are recorded.
            if not self.final_parity.passed and not config.quality:
                raise QualityGateFailed(
                    f"parity gate failed: {scheme.value} TFLite logits differ from PyTorch by "
                    f"{self.final_parity.max_abs_diff:.3g}, more than "
                    f"{self.final_parity.tolerance} = {self.final_parity.atol:.3g}; nothing was "
                    "written",
                    self.final_parity.to_dict(),
                )
        quality: dict = {"skipped": "quality card turned off (quality=false)"}
        self.gate = None  # the manifest's gate, as a quantized ONNX export's
        if config.quality:
            say("quality card")
            quality = _quality(
                config, stage, candidate,
                self.reference if scheme is not QuantScheme.fp32 else None, say
            )
            rise = quality.get("ppl_increase_pct")
            if scheme is not QuantScheme.fp32 and rise is not None:
                self.gate = {"max_ppl_increase_pct": config.max_ppl_increase,
                             "passed": rise <= config.max_ppl_increase}
                if rise > config.max_ppl_increase:
                    raise QualityGateFailed(
                        f"quality gate failed: {scheme.value} TFLite perplexity "
                        f"{quality['perplexity']:.3f} is {rise:+.2f}% over the fp32 graph's "
                        f"{quality['reference_perplexity']:.3f} (allowed "
                        f"+{config.max_ppl_increase:g}%, --max-ppl-increase); nothing was written",
                        {**quality, "gate": self.gate},
                    )
        self.quality = quality
        fixture_prompt, fixture_steps = parity_inputs(
            model.config.vocab_size, candidate.context_length, [8], seed=1
        )
        self.fixture = parity_fixture(candidate, fixture_prompt[:8], fixture_steps)
        del candidate
        self.reference = None
        if scheme is not QuantScheme.fp32:
            self.fp32_path.unlink()

    def fields(self, stage: Path, loaded) -> tuple[dict, set[str]]:
        config = self.config
        return {
            "format": "tflite",
            "model_file": MODEL_FILE,
            "recipe": {
                "quant": self.scheme.value,
                "context_length": config.context_length,
                "prefill_chunks": config.prefill_chunks,
                "profile": config.profile,
            },
            "tflite": {
                **self.graph.to_dict(),
                "quantization": self.quant_report.to_dict() if self.quant_report else None,
                "runtime": "ai-edge-litert (tflite-runtime only after parity_fixture passes)",
                "parity_fixture": self.fixture,
                # top-k values are rounded to 1e-5; kernels of another runtime may differ
                # within the quantization noise of the recipe
                "fixture_atol": max(1e-3, self.final_parity.atol),
                "versions": _stack_versions(),
            },
            "quality": self.quality,
            **({"gate": self.gate} if self.gate else {}),
            # the gate's parity is the fp32 graph's; the artifact's is the candidate's
            "verification": {"parity": self.final_parity.to_dict(),
                             "parity_fp32": self.parity_fp32.to_dict()},
        }, {MODEL_FILE}


def _reuse_fp32(config: TfliteExportConfig, source: dict) -> tuple[bytes, TfliteGraphInfo]:
    """The fp32 flatbuffer of an earlier export, when it is of the same source and sizes."""
    from slmedge.runtimes.artifact import open_artifact
    from slmedge.runtimes.errors import UsageError

    artifact = open_artifact(config.from_artifact)
    m = artifact.info
    if m is None or m.recipe is None:
        raise UsageError(f"--from-artifact {config.from_artifact}: not an artifact directory "
                         "written by slmedge export --format tflite")
    recipe = m.recipe
    problems = []
    if m.format != "tflite" or recipe.quant != "fp32":
        problems.append(
            f"it is a {m.format} {recipe.quant or '?'} artifact, not an fp32 TFLite one"
        )
    if recipe.context_length != config.context_length:
        problems.append(f"context_length {recipe.context_length} != {config.context_length}")
    if recipe.prefill_chunks != config.prefill_chunks:
        problems.append(f"prefill_chunks {recipe.prefill_chunks} != {config.prefill_chunks}")
    if artifact.manifest.get("source") != source:  # the JSON as written, hashes included
        problems.append("its source model differs (location or file hashes)")
    if problems:
        raise UsageError(f"--from-artifact {config.from_artifact}: {'; '.join(problems)}")
    problems = artifact.verify_hashes()
    if problems:
        raise UsageError(f"--from-artifact {config.from_artifact}: {'; '.join(problems)}")
    info = m.tflite
    graph = TfliteGraphInfo(
        signatures=info.signatures,
        context_length=info.context_length,
        prefill_chunks=info.prefill_chunks,
        kv_shape=info.kv_shape,
        kv_dtype=info.kv_dtype,
        prefill_logits=info.prefill_logits,
        seconds=0.0,
    )
    return artifact.model_path.read_bytes(), graph


def _calibration_ids(stage: Path) -> list[int]:
    """Token ids of the packaged calibration text (a different book from the evaluation one)."""
    from slmedge.runtimes.texts import default_calibration_text

    path = default_calibration_text()
    if not path.is_file():
        from slmedge.runtimes.errors import UsageError

        raise UsageError(f"int8-static needs calibration text; {path} is missing")
    return TextTokenizer(stage).encode(path.read_text(encoding="utf-8", errors="replace"))[:8192]
