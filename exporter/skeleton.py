"""The one export skeleton (issue 13) that the ONNX, static-shape and TFLite flows share.

::

    check output -> flow.check -> flow.load -> stage -> flow.convert -> support files
      -> flow.parity -> flow.card -> flow.fields (+ extras: .ort files, profile, placement)
      -> manifest (written once, validated) -> rename into place

A flow is an :class:`ExportSteps` subclass: it supplies its checks, its source loading, its
conversion, its parity gate, its quality card (with quantization, where the flow quantizes)
and its own manifest fields; everything else (the staging directory, the tokenizer and
configs beside the graph, the provenance and architecture fields, the step timings, the
manifest) is here, once. A device profile adds its steps as an :class:`Extra` (``.ort``
files, the profile, the placement check) before the manifest is written: nothing reads a
written manifest back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slmedge.runtimes.errors import ArtifactError
from slmedge.runtimes.tokenizer import TextTokenizer

from .manifest import build_manifest, save_manifest
from .staging import check_output, staged_directory

Progress = Callable[[str], None]


def _stop_token_ids(model, tokenizer, spec) -> list[int]:
    """EOS ids from the generation config and tokenizer, plus the family's end-of-turn tokens
    that this vocabulary has: a chat user expects generation to stop at the end of a turn."""
    ids: set[int] = set()
    eos = model.generation_config.eos_token_id
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    template = getattr(tokenizer, "chat_template", None) or ""
    for token in spec.end_of_turn_tokens:
        if token in vocab and (token in template or not template):
            ids.add(vocab[token])
    return sorted(ids)


def _check_runtime_tokenizer(stage: Path, tokenizer) -> dict:
    """The torch-free tokenizer must encode exactly as transformers does (text and chat)."""
    runtime = TextTokenizer(stage)
    sample = "The quick brown fox jumps over the lazy dog. 1234 naïve — ok?\n  Indented."
    want = tokenizer(sample).input_ids
    got = runtime.encode(sample)
    if got != want:
        raise ArtifactError(
            f"the saved tokenizer.json encodes differently from transformers ({got[:8]}... vs "
            f"{want[:8]}...); this tokenizer type is not supported yet"
        )
    report = {"encode_matches_transformers": True, "chat_template": bool(runtime.chat_template)}
    if runtime.chat_template:
        messages = [{"role": "user", "content": "Hi there"}]
        want_chat = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        got_chat = runtime.apply_chat_template(messages)
        if want_chat != got_chat:
            raise ArtifactError(
                f"the chat template renders differently without transformers: {got_chat!r} vs "
                f"{want_chat!r}"
            )
        report["chat_template_matches_transformers"] = True
    return report


def save_support_files(stage: Path, model, tokenizer, spec) -> dict:
    """Tokenizer, generation config (stop ids) and model config beside the graph; returns
    the check that the runtime tokenizer encodes as transformers does."""
    tokenizer.save_pretrained(str(stage))
    model.generation_config.eos_token_id = _stop_token_ids(model, tokenizer, spec)
    model.generation_config.save_pretrained(str(stage))
    model.config.save_pretrained(str(stage))
    return _check_runtime_tokenizer(stage, tokenizer)


def architecture_facts(model, spec) -> dict:
    """The manifest's ``architecture`` block (what the runtimes size the KV cache from)."""
    layers, kv_heads, head_dim = spec.kv_layout(model.config)
    return {
        "model_type": model.config.model_type,
        "family": spec.family,
        "num_layers": layers,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": model.config.vocab_size,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


class ExportSteps:
    """One export flow's own steps, run in order by :func:`run_steps`. A subclass keeps what
    one step hands the next on ``self``.

    ``loaded`` (what :meth:`load` returns) has ``model`` (its ``config`` and
    ``generation_config``), ``tokenizer``, ``spec`` (the architecture) and ``source``
    (``to_dict()`` is the manifest's ``source``)."""

    #: the card step's key in the manifest's ``timings_s``
    card_phase = "card"

    def check(self) -> None:
        """Usage errors found without the weights (after the output check, before loading)."""

    def load(self, say: Progress) -> Any:
        raise NotImplementedError

    def convert(self, stage: Path, loaded, say: Progress) -> dict[str, float]:
        """Write the graph(s) into ``stage``; returns seconds per phase for ``timings_s``."""
        raise NotImplementedError

    def parity(self, stage: Path, loaded, say: Progress) -> dict:
        """The parity gate (QualityGateFailed when it fails); the manifest's
        ``verification.parity``."""
        raise NotImplementedError

    def card(self, stage: Path, loaded, parity: dict, say: Progress) -> None:
        """Quantize where the flow does, and the quality card (its gate included)."""
        raise NotImplementedError

    def fields(self, stage: Path, loaded) -> tuple[dict, set[str]]:
        """The flow's own manifest fields (``verification`` and ``timings_s`` dicts are
        merged into the skeleton's) and the files whose role is ``model``."""
        raise NotImplementedError


class Extra:
    """Steps added to a flow by a device profile, after the flow's own and before the
    manifest is written."""

    def files(self, stage: Path, fields: dict, say: Progress) -> tuple[dict, set[str]]:
        """Files written beside the graphs: manifest fields and the new model files."""
        return {}, set()

    def check(self, stage: Path, manifest: dict, final: Path, say: Progress) -> dict:
        """Checks of the complete artifact in ``stage`` (its manifest, not yet written, in
        hand); ``final`` is where it will be renamed to. Returns manifest fields."""
        return {}


def run_steps(steps: ExportSteps, output: Path, overwrite: bool, progress: Progress | None,
              *, command: str | None = None, extras: tuple[Extra, ...] = ()) -> dict:
    """Run one export flow through the skeleton; returns the manifest written into
    ``output``. ``command`` is recorded in the manifest (default: ``sys.argv``)."""
    say = progress or (lambda _msg: None)
    check_output(output, overwrite)  # before minutes of work
    steps.check()
    t0 = time.perf_counter()
    loaded = steps.load(say)
    model = loaded.model
    timings: dict[str, Any] = {"load": round(time.perf_counter() - t0, 2)}
    with staged_directory(output, overwrite) as stage:
        timings.update(steps.convert(stage, loaded, say))
        clock = time.perf_counter()

        def lap(phase: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            timings[phase] = round(now - clock, 2)
            clock = now

        say("saving tokenizer and generation config")
        tokenizer_report = save_support_files(stage, model, loaded.tokenizer, loaded.spec)
        lap("support_files")
        parity = steps.parity(stage, loaded, say)
        lap("parity")
        steps.card(stage, loaded, parity, say)
        lap(steps.card_phase)
        own, model_files = steps.fields(stage, loaded)
        verification = {"parity": parity, "tokenizer": tokenizer_report,
                        **own.pop("verification", {})}
        own_timings = own.pop("timings_s", {})
        fields = {
            **({"command": command} if command else {}),
            "source": loaded.source.to_dict(),
            "architecture": architecture_facts(model, loaded.spec),
            **own,
            "stop_token_ids": model.generation_config.eos_token_id,
            "verification": verification,
            "timings_s": {**timings, **own_timings, "total": round(time.perf_counter() - t0, 2)},
        }
        for extra in extras:
            more, files = extra.files(stage, fields, say)
            fields.update(more)
            model_files |= files
        manifest = build_manifest(stage, fields, model_files)
        for extra in extras:
            manifest.update(extra.check(stage, manifest, Path(output), say))
        save_manifest(stage, manifest)
    return manifest
