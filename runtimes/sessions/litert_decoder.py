"""A KV-cache decoder on LiteRT (``ai-edge-litert``): no torch, no TensorFlow.

Runs the ``.tflite`` files ``slmedge export --format tflite`` writes (the contract is in
``slmedge.exporter.tflite.convert``): signatures ``prefill_<T>`` (T tokens at a time,
logits of every position) and ``decode`` (one token), with a static KV cache of
``context_length`` rows passed in and out of every call.

A prompt is fed in the largest prefill chunks that fit; the tail is padded up to the
smallest chunk that holds it (padding rows are masked and later overwritten), or fed
one token at a time through ``decode`` when no padded chunk fits the cache. The decoder
keeps the cache inside LiteRT between calls, so ``reset()`` costs nothing: rows past
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

from slmedge.runtimes.errors import ArtifactError, ProviderUnavailable, QualityGateFailed, UsageError

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


def _load_error(path: Path, e: Exception) -> ArtifactError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return ArtifactError(
        f"LiteRT could not load {path}: {first[:300]} — the file is corrupt, truncated or uses "
        "ops this runtime lacks; export it again"
    )


class _InterpreterEngine:
    """The classic ``Interpreter`` signature runners (the API tflite-runtime also has): the
    cache goes through numpy on every call (set_tensor / get_tensor copies)."""

    def __init__(self, path: Path, threads: int | None, interpreter_cls):
        try:
            self.interpreter = interpreter_cls(model_path=str(path), num_threads=threads or None)
        except (ValueError, RuntimeError) as e:
            raise _load_error(path, e) from None
        self.signatures = self.interpreter.get_signature_list()
        self._runners = {n: self.interpreter.get_signature_runner(n) for n in self.signatures}
        self.kv: dict[str, np.ndarray] = {}

    def input_details(self, sig: str) -> dict:
        return {
            k: {"shape": tuple(int(x) for x in v["shape"]), "dtype": np.dtype(v["dtype"])}
            for k, v in self._runners[sig].get_input_details().items()
        }

    def vocab_size(self) -> int:
        return int(self._runners[DECODE_SIGNATURE].get_output_details()["logits"]["shape"][-1])

    def init_cache(self, names: list[str], shape: tuple, dtype) -> None:
        self.kv = {n: np.zeros(shape, dtype=dtype) for n in names}

    def run(self, sig: str, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        out = self._runners[sig](tokens=tokens, input_pos=positions, **self.kv)
        self.kv = {name: out[name] for name in self.kv}
        return out["logits"][0]

    def cache_arrays(self) -> dict[str, np.ndarray]:
        return {n: a.copy() for n, a in self.kv.items()}


class _CompiledEngine:
    """ai-edge-litert's ``CompiledModel``: the cache lives in LiteRT tensor buffers, two sets
    used in turn (this call's output is the next call's input), so it never crosses into
    Python; only token ids, positions and logits are copied."""

    def __init__(self, path: Path, threads: int | None):
        from ai_edge_litert.compiled_model import CompiledModel
        from ai_edge_litert.options import CpuOptions, Options

        options = Options(cpu_options=CpuOptions(num_threads=threads or 0))
        try:
            self.model = CompiledModel.from_file(str(path), options=options)
        except (ValueError, RuntimeError) as e:
            raise _load_error(path, e) from None
        self.signatures = self.model.get_signature_list()
        self._io: dict[str, tuple] = {}
        self._cur: dict = {}
        self._next: dict = {}
        self._shape: tuple = ()

    def input_details(self, sig: str) -> dict:
        return {
            k: {"shape": tuple(int(x) for x in v["shape"]), "dtype": np.dtype(v["dtype"])}
            for k, v in self.model.get_input_tensor_details(sig).items()
        }

    def vocab_size(self) -> int:
        return int(self.model.get_output_tensor_details(DECODE_SIGNATURE)["logits"]["shape"][-1])

    def init_cache(self, names: list[str], shape: tuple, dtype) -> None:
        m = self.model
        self._cur = {n: m.create_input_buffer_by_name(DECODE_SIGNATURE, n) for n in names}
        self._next = {n: m.create_output_buffer_by_name(DECODE_SIGNATURE, n) for n in names}
        self._shape, self._dtype = shape, dtype
        zeros = np.zeros(shape, dtype=dtype)
        for buf in (*self._cur.values(), *self._next.values()):
            buf.write(zeros)
        for sig in self.signatures:
            logits = self.model.get_output_tensor_details(sig)["logits"]["shape"]
            self._io[sig] = (
                m.create_input_buffer_by_name(sig, "tokens"),
                m.create_input_buffer_by_name(sig, "input_pos"),
                m.create_output_buffer_by_name(sig, "logits"),
                (int(logits[-2]), int(logits[-1])),
            )

    def run(self, sig: str, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        tok, pos, logits, shape = self._io[sig]
        tok.write(tokens)
        pos.write(positions)
        self.model.run_by_name(
            sig, {"tokens": tok, "input_pos": pos, **self._cur}, {"logits": logits, **self._next}
        )
        self._cur, self._next = self._next, self._cur
        return logits.read(shape[0] * shape[1], np.float32).reshape(shape)

    def cache_arrays(self) -> dict[str, np.ndarray]:
        n = int(np.prod(self._shape))
        return {k: b.read(n, self._dtype).reshape(self._shape) for k, b in self._cur.items()}


class LiteRTDecoder:
    """Runs a prefill/decode ``.tflite`` with a static KV cache kept inside LiteRT.

    ``engine``: ``compiled`` (ai-edge-litert's CompiledModel, the cache stays in LiteRT
    buffers) or ``interpreter`` (signature runners; the only API of tflite-runtime);
    ``auto`` picks compiled where it exists.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        threads: int | None = None,
        backend: str = "auto",
        engine: str = "auto",
    ):
        self.model_path = Path(model_path)
        self.backend, self.backend_version, interpreter_cls = load_interpreter_class(backend)
        if not self.model_path.is_file():
            raise ArtifactError(f"{self.model_path}: no such .tflite file")
        if engine == "auto":
            engine = "compiled" if self.backend == "ai-edge-litert" else "interpreter"
        if engine not in ("compiled", "interpreter"):
            raise UsageError(f"unknown LiteRT engine '{engine}'; choose compiled or interpreter")
        if engine == "compiled" and self.backend != "ai-edge-litert":
            raise ProviderUnavailable(
                f"the compiled engine needs ai-edge-litert, not {self.backend}"
            )
        self.engine_name = engine
        self.threads = threads
        self._engine = (
            _CompiledEngine(self.model_path, threads)
            if engine == "compiled"
            else _InterpreterEngine(self.model_path, threads, interpreter_cls)
        )
        signatures = self._engine.signatures
        if DECODE_SIGNATURE not in signatures:
            raise ArtifactError(
                f"{self.model_path} has no '{DECODE_SIGNATURE}' signature (it has "
                f"{sorted(signatures)}); it was not written by slmedge export --format tflite"
            )
        self._decode = _Signature(DECODE_SIGNATURE, 1)
        self._prefill = sorted(
            (
                _Signature(name, int(m.group(1)))
                for name in signatures
                if (m := _PREFILL_RE.match(name))
            ),
            key=lambda s: s.tokens,
        )
        inputs = self._engine.input_details(DECODE_SIGNATURE)
        kv = sorted((int(m.group(2)), m.group(1), n) for n in inputs if (m := _KV_RE.match(n)))
        if not kv or "tokens" not in inputs or "input_pos" not in inputs:
            raise ArtifactError(
                f"{self.model_path}: the decode signature lacks tokens / input_pos / kv_cache "
                f"inputs (has {sorted(inputs)})"
            )
        self.kv_names = [n for _, _, n in kv]
        first = inputs[self.kv_names[0]]
        self.kv_shape = first["shape"]
        self.kv_dtype = first["dtype"]
        self.context_length = self.kv_shape[2]
        self.num_layers = len(self.kv_names) // 2
        self.vocab_size = self._engine.vocab_size()
        self._engine.init_cache(self.kv_names, self.kv_shape, self.kv_dtype)
        self._length = 0

    @property
    def length(self) -> int:
        """Tokens held in the KV cache."""
        return self._length

    @property
    def prefill_chunks(self) -> list[int]:
        return [s.tokens for s in self._prefill]

    def providers(self) -> list[str]:
        """What runs the graph, for the bench record."""
        return [f"{self.backend} {self.backend_version} ({self.engine_name}, CPU, XNNPACK)"]

    def cache_arrays(self) -> dict[str, np.ndarray]:
        """A copy of the KV cache (rows past :attr:`length` are stale), e.g. for calibration."""
        return self._engine.cache_arrays()

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
            logits = self._engine.run(
                sig.name,
                np.asarray([chunk], dtype=np.int32),
                np.arange(self._length, self._length + sig.tokens, dtype=np.int32),
            )
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
