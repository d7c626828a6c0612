"""A KV-cache decoder on LiteRT (``ai-edge-litert``): no torch, no TensorFlow.

Runs the ``.tflite`` files ``slmedge export --format tflite`` writes (the contract is in
``slmedge.exporter.tflite_graph``): signatures ``prefill_<T>`` (T tokens at a time,
logits of every position) and ``decode`` (one token), with a static KV cache of
``context_length`` rows passed in and out of every call.

A prompt is fed in the largest prefill chunks that fit; the tail is padded up to the
smallest chunk that holds it (padding rows are masked and later overwritten), or fed
one token at a time through ``decode`` when no padded chunk fits the cache. The decoder
keeps the cache as numpy arrays between calls, so ``reset()`` costs nothing: rows past
the current length are never attended to.

``tflite-runtime`` (2023, the only wheel on 32-bit Raspberry Pi OS) is accepted as a
fallback only, and only after the artifact's stored parity fixture passes on it: it
returned all-zero logits for dynamic-int8 models without an error (DESIGN.md).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ArtifactError, ProviderUnavailable, QualityGateFailed, UsageError

DECODE_SIGNATURE = "decode"
_PREFILL_RE = re.compile(r"^prefill_(\d+)$")
_KV_RE = re.compile(r"^kv_cache_([kv])_(\d+)$")
BACKENDS = ("ai-edge-litert", "tflite-runtime")


def load_interpreter_class(backend: str = "auto"):
    """``(backend name, version, Interpreter class)``: ai-edge-litert, else tflite-runtime."""
    if backend not in ("auto", *BACKENDS):
        raise UsageError(f"unknown LiteRT backend '{backend}'; choose auto, {', '.join(BACKENDS)}")
    if backend in ("auto", "ai-edge-litert"):
        try:
            from importlib import metadata

            from ai_edge_litert.interpreter import Interpreter

            return "ai-edge-litert", metadata.version("ai-edge-litert"), Interpreter
        except ImportError:
            if backend == "ai-edge-litert":
                raise ProviderUnavailable(
                    "asked for the ai-edge-litert backend, but it is not installed: "
                    "pip install 'slmedge[litert]' (or ai-edge-litert)"
                ) from None
    try:
        from importlib import metadata

        from tflite_runtime.interpreter import Interpreter

        return "tflite-runtime", metadata.version("tflite-runtime"), Interpreter
    except ImportError:
        raise ProviderUnavailable(
            "running a .tflite artifact needs ai-edge-litert (pip install 'slmedge[litert]'); "
            "tflite-runtime is accepted only where ai-edge-litert has no wheel"
        ) from None


@dataclass(frozen=True)
class _Signature:
    name: str
    tokens: int
    runner: object


class LiteRTDecoder:
    """Runs a prefill/decode ``.tflite`` with a static KV cache held as numpy arrays."""

    def __init__(
        self, model_path: str | Path, *, threads: int | None = None, backend: str = "auto"
    ):
        self.model_path = Path(model_path)
        self.backend, self.backend_version, interpreter_cls = load_interpreter_class(backend)
        if not self.model_path.is_file():
            raise ArtifactError(f"{self.model_path}: no such .tflite file")
        try:
            self.interpreter = interpreter_cls(
                model_path=str(self.model_path), num_threads=threads or None
            )
        except (ValueError, RuntimeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ArtifactError(
                f"LiteRT could not load {self.model_path}: {first[:300]} — the file is corrupt, "
                "truncated or uses ops this runtime lacks; export it again"
            ) from None
        self.threads = threads
        signatures = self.interpreter.get_signature_list()
        if DECODE_SIGNATURE not in signatures:
            raise ArtifactError(
                f"{self.model_path} has no '{DECODE_SIGNATURE}' signature (it has "
                f"{sorted(signatures)}); it was not written by slmedge export --format tflite"
            )
        self._decode = self._signature(DECODE_SIGNATURE, 1)
        self._prefill = sorted(
            (
                self._signature(name, int(m.group(1)))
                for name in signatures
                if (m := _PREFILL_RE.match(name))
            ),
            key=lambda s: s.tokens,
        )
        inputs = self._decode.runner.get_input_details()
        kv = sorted((int(m.group(2)), m.group(1), n) for n in inputs if (m := _KV_RE.match(n)))
        if not kv or "tokens" not in inputs or "input_pos" not in inputs:
            raise ArtifactError(
                f"{self.model_path}: the decode signature lacks tokens / input_pos / kv_cache "
                f"inputs (has {sorted(inputs)})"
            )
        self.kv_names = [n for _, _, n in kv]
        first = inputs[self.kv_names[0]]
        self.kv_shape = tuple(int(d) for d in first["shape"])
        self.kv_dtype = first["dtype"]
        self.context_length = self.kv_shape[2]
        self.num_layers = len(self.kv_names) // 2
        logits = self._decode.runner.get_output_details()["logits"]
        self.vocab_size = int(logits["shape"][-1])
        self._kv = {n: np.zeros(self.kv_shape, dtype=self.kv_dtype) for n in self.kv_names}
        self._length = 0

    def _signature(self, name: str, tokens: int) -> _Signature:
        return _Signature(name, tokens, self.interpreter.get_signature_runner(name))

    @property
    def length(self) -> int:
        """Tokens held in the KV cache."""
        return self._length

    @property
    def prefill_chunks(self) -> list[int]:
        return [s.tokens for s in self._prefill]

    def providers(self) -> list[str]:
        """What runs the graph, for the bench record."""
        return [f"{self.backend} {self.backend_version} (CPU, XNNPACK)"]

    def reset(self) -> None:
        """Forget the cached sequence. The cache rows stay: past the length they are masked."""
        self._length = 0

    def _plan(self, start: int, n: int) -> list[tuple[_Signature, int]]:
        """``[(signature, real tokens)]`` that feed ``n`` tokens from position ``start``."""
        plan: list[tuple[_Signature, int]] = []
        pos, left = start, n
        while left > 0:
            chosen = None
            if left > 1:
                fits = [s for s in self._prefill if pos + s.tokens <= self.context_length]
                full = [s for s in fits if s.tokens <= left]
                if full and full[-1].tokens == max(s.tokens for s in self._prefill):
                    chosen = full[-1]  # a whole largest chunk: no padding
                else:
                    padded = [s for s in fits if s.tokens >= left]
                    chosen = padded[0] if padded else (full[-1] if full else None)
            sig = chosen or self._decode
            real = min(left, sig.tokens)
            plan.append((sig, real))
            pos += real
            left -= real
        return plan

    def step(self, token_ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Feed tokens after the cached ones; return the logits of the last one ``[vocab]``
        (or of every fed token, ``[n, vocab]``, when ``all_logits``)."""
        ids = [int(t) for t in token_ids]
        n = len(ids)
        if n == 0:
            raise ValueError("step() needs at least one token")
        if self._length + n > self.context_length:
            raise UsageError(
                f"the static KV cache holds {self.context_length} tokens; {self._length} are "
                f"used and {n} more were fed. Export with a larger --context-length"
            )
        rows: list[np.ndarray] = []
        done = 0
        plan = self._plan(self._length, n)
        for k, (sig, real) in enumerate(plan):
            chunk = ids[done : done + real] + [0] * (sig.tokens - real)
            out = sig.runner(
                tokens=np.asarray([chunk], dtype=np.int32),
                input_pos=np.arange(self._length, self._length + sig.tokens, dtype=np.int32),
                **self._kv,
            )
            self._kv = {name: out[name] for name in self.kv_names}
            logits = out["logits"][0]
            if all_logits:
                rows.append(logits[:real])
            elif k == len(plan) - 1:
                rows.append(logits[real - 1 : real])
            self._length += real
            done += real
        logits = np.concatenate(rows) if len(rows) > 1 else rows[0]
        return logits if all_logits else logits[-1]

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Logits ``[n, vocab]`` of a sequence from scratch (the cache is reset first)."""
        self.reset()
        try:
            return self.step(token_ids, all_logits=True)
        finally:
            self.reset()


# -- the parity fixture: the gate for a fallback runtime --------------------------------------


def parity_fixture(
    decoder: LiteRTDecoder, prompt: Sequence[int], steps: Sequence[int], top_k: int = 8
) -> dict:
    """Top-k logits of a prefill and a few decode steps: stored in the manifest at export time."""
    rows = [decoder.logits(list(prompt))]
    decoder.reset()
    decoder.step(list(prompt))
    for tok in steps:
        rows.append(decoder.step([int(tok)], all_logits=True))
    decoder.reset()
    logits = np.concatenate(rows)
    top = np.argsort(-logits, axis=-1)[:, :top_k]
    return {
        "prompt": [int(t) for t in prompt],
        "steps": [int(t) for t in steps],
        "top_ids": top.tolist(),
        "top_values": np.take_along_axis(logits, top, axis=-1).round(5).tolist(),
    }


def check_parity_fixture(decoder: LiteRTDecoder, fixture: dict, atol: float) -> float:
    """Re-run the fixture; raise :class:`QualityGateFailed` when this runtime disagrees."""
    rows = [decoder.logits(fixture["prompt"])]
    decoder.step(fixture["prompt"])
    for tok in fixture["steps"]:
        rows.append(decoder.step([tok], all_logits=True))
    decoder.reset()
    logits = np.concatenate(rows)
    ids = np.asarray(fixture["top_ids"])
    want = np.asarray(fixture["top_values"], dtype=np.float64)
    got = np.take_along_axis(logits, ids, axis=-1).astype(np.float64)
    diff = float(np.abs(got - want).max())
    if diff > atol or not np.array_equal(logits.argmax(-1), ids[:, 0]):
        raise QualityGateFailed(
            f"{decoder.backend} {decoder.backend_version} does not reproduce this artifact's "
            f"logits (max |diff| {diff:.3g} on the stored fixture, allowed {atol:.3g}); install "
            "ai-edge-litert, or use a float/weight-only recipe on this device",
            {"max_abs_diff": diff, "atol": atol, "backend": decoder.backend},
        )
    return diff


def open_litert_decoder(
    artifact, *, threads: int | None = None, backend: str = "auto"
) -> LiteRTDecoder:
    """The decoder of a TFLite artifact; a fallback runtime must pass the parity fixture first."""
    decoder = LiteRTDecoder(artifact.model_path, threads=threads, backend=backend)
    if decoder.backend != "ai-edge-litert":
        tflite = artifact.manifest.get("tflite", {})
        fixture = tflite.get("parity_fixture")
        if not fixture:
            raise ProviderUnavailable(
                f"{decoder.backend} is accepted only after the artifact's parity fixture passes "
                "on it, and this artifact has none; install ai-edge-litert"
            )
        check_parity_fixture(decoder, fixture, float(tflite.get("fixture_atol", 1e-3)))
    return decoder
