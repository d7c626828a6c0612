"""Run a static-shape artifact (prefill + decode graphs over a fixed KV cache; no torch).

The contract is in ``slmedge.exporter.onnx.static_shapes``: the cache is a fixed numpy buffer
``[1, kv_heads, C, head_dim]`` per layer whose slot ``j`` holds position ``j``; each call
feeds the whole buffer plus an additive bias saying which slots are valid, and gets back
only the new entries, which are written into their slots here.

A prompt is fed in chunks of ``prefill_chunk`` tokens (the last one padded; padded tokens
are masked out for everyone and their entries are not written); single tokens go through
the decode graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from slmedge.runtimes.errors import ArtifactError, UsageError

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def build_bias(length: int, n_valid: int, chunk: int, context: int, window: int | None,
               dtype=np.float32) -> np.ndarray:
    """Additive attention bias ``[1, 1, chunk, context + chunk]``.

    Query ``q`` (position ``length + q``) may see cache slot ``k < length`` and new token
    ``j <= q`` (``j < n_valid``), within ``window`` positions when given. A padded query
    (``q >= n_valid``) sees only itself, so no row is fully masked."""
    q = np.arange(chunk)[:, None]
    q_pos = length + q
    k = np.arange(context + chunk)[None, :]
    is_new = k >= context
    k_pos = np.where(is_new, length + (k - context), k)
    allowed = np.where(is_new, ((k - context) <= q) & ((k - context) < n_valid), k < length)
    if window is not None:
        allowed &= (q_pos - k_pos) < window
    padded = q >= n_valid
    allowed = np.where(padded, is_new & ((k - context) == q), allowed)
    bias = np.where(allowed, 0.0, np.finfo(dtype).min).astype(dtype)
    return bias.reshape(1, 1, chunk, context + chunk)


class StaticDecoder:
    """The :class:`~slmedge.runtimes.generation.Decoder` of a static-shape artifact."""

    def __init__(self, root: str | Path, static: dict, *, threads: int | None = None,
                 providers=None, strict: bool = False, allow_cpu_fallback: bool = True,
                 share_weights: bool = False):
        """``share_weights``: both sessions compute from one read-only mapping of the
        weights file (``runtimes.sessions.shared_weights``; CPU provider only, pre-packing off: less
        memory, slower prefill). :attr:`weight_sharing` says what was shared, or why not."""
        from .onnx_decoder import make_session
        from .providers import placement_of

        root = Path(root)
        try:
            self.context = int(static["context_length"])
            self.chunk = int(static["prefill_chunk"])
            self.masks: dict[str, int | None] = dict(static["mask_inputs"])
            files = {"prefill": root / static["prefill_file"], "decode": root / static["decode_file"]}
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{root}: the manifest's 'static' section is incomplete ({e}); "
                                "export the artifact again") from None
        kwargs = dict(threads=threads, providers=providers, strict=strict,
                      allow_cpu_fallback=allow_cpu_fallback)
        self.shared_weights = None
        self.weight_sharing: dict = {"enabled": False, "reason": "share_weights is off"}
        if share_weights:
            self.shared_weights, self.weight_sharing = _share(files, providers)
        self.sessions = {}
        for kind, path in files.items():
            shared = self.shared_weights
            if shared is None:
                self.sessions[kind] = make_session(path, **kwargs)
                continue
            self.sessions[kind] = make_session(path, session_options=shared.session_options(path),
                                               **kwargs)
            # the OrtValues must outlive every session that uses them
            self.sessions[kind]._slmedge_shared_weights = shared
        self.model_path = files["decode"]
        self.placement = {kind: placement_of(s) for kind, s in self.sessions.items()}
        inputs = {i.name: i for i in self.sessions["decode"].get_inputs()}
        self.past_names = sorted((n for n in inputs if n.startswith("past_key_values.")),
                                 key=lambda n: (int(n.split(".")[1]), n.endswith("value")))
        self.new_names = [n.replace("past_key_values", "kv_new") for n in self.past_names]
        missing = [m for m in ("input_ids", "position_ids", *self.masks) if m not in inputs]
        if missing or not self.past_names:
            raise ArtifactError(f"{files['decode']} lacks the static-shape inputs {missing or ['past_key_values.*']}")
        first = inputs[self.past_names[0]]
        self.dtype = _ORT_TYPES.get(first.type, np.float32)
        _, self.kv_heads, slots, self.head_dim = first.shape
        if slots != self.context:
            raise ArtifactError(f"{files['decode']}: cache has {slots} slots, manifest says "
                                f"{self.context}")
        bias_type = inputs[next(iter(self.masks))].type
        self.bias_dtype = _ORT_TYPES.get(bias_type, np.float32)
        vocab = self.sessions["decode"].get_outputs()[0].shape[-1]
        self.vocab_size = vocab if isinstance(vocab, int) else None
        self._cache = [np.zeros((1, self.kv_heads, self.context, self.head_dim), self.dtype)
                       for _ in self.past_names]
        self._length = 0

    @property
    def length(self) -> int:
        """Tokens held in the KV cache."""
        return self._length

    def providers(self) -> list[str]:
        return self.sessions["decode"].get_providers()

    def reset(self) -> None:
        """Forget the sequence (stale slots are masked, so the buffers are not cleared)."""
        self._length = 0

    def _run(self, kind: str, tokens: Sequence[int]) -> np.ndarray:
        chunk = 1 if kind == "decode" else self.chunk
        n = len(tokens)
        ids = np.zeros((1, chunk), np.int64)
        ids[0, :n] = tokens
        # Padded tokens get positions inside the window (learned position tables end there).
        pos = np.minimum(np.arange(self._length, self._length + chunk), self.context - 1)
        feed = {"input_ids": ids, "position_ids": pos.reshape(1, chunk).astype(np.int64)}
        for name, window in self.masks.items():
            feed[name] = build_bias(self._length, n, chunk, self.context, window, self.bias_dtype)
        feed.update(zip(self.past_names, self._cache, strict=True))
        outs = self.sessions[kind].run(None, feed)
        for cache, new in zip(self._cache, outs[1:], strict=True):
            cache[:, :, self._length:self._length + n, :] = new[:, :, :n, :]
        self._length += n
        return outs[0][0, :n]

    def step(self, token_ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Feed tokens after the cached ones; logits of the last (or of every) token."""
        n = len(token_ids)
        if n == 0:
            raise ValueError("step() needs at least one token")
        if self._length + n > self.context:
            raise UsageError(
                f"the static context window holds {self.context} tokens: {self._length} cached "
                f"+ {n} new do not fit; shorten the prompt or --max-new-tokens, or export with "
                "a profile of a larger context_length")
        if n == 1:
            logits = self._run("decode", token_ids)
        else:
            parts = [self._run("prefill", token_ids[i:i + self.chunk])
                     for i in range(0, n, self.chunk)]
            logits = np.concatenate(parts)
        return logits if all_logits else logits[-1]

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Logits ``[n, vocab]`` of a sequence from scratch (the cache is reset first)."""
        self.reset()
        try:
            return self.step(token_ids, all_logits=True)
        finally:
            self.reset()


def _share(files: dict[str, Path], providers) -> tuple:
    """(SharedWeights or None, the report) for the graphs ``files`` on ``providers``."""
    from .providers import CPU
    from .shared_weights import SharedWeights

    others = [name for name, _ in (providers or []) if name != CPU]
    if others:
        # QNN / CoreML / NNAPI compile the graph and copy the weights into their own model;
        # user-owned initializers were not verified there, so those sessions stay as they were.
        return None, {"enabled": False, "reason": f"sessions on {', '.join(others)}: weights "
                      "are shared on the CPU provider only"}
    if any(p.suffix != ".onnx" for p in files.values()):
        return None, {"enabled": False, "reason": "ORT-format graphs hold their own weights"}
    try:
        shared = SharedWeights(files.values())
    except (OSError, ValueError) as e:  # ONNX Runtime's own load says what is wrong
        return None, {"enabled": False, "reason": f"could not read the graphs' weights: {e}"}
    if not shared.tensors:
        return None, {"enabled": False, "reason": "no tensor in an external-data file"}
    report = shared.report(files.values())
    report["per_graph"] = {kind: report["per_graph"][p.name] for kind, p in files.items()}
    return shared, report


def open_decoder(artifact, *, threads: int | None = None, providers=None, strict: bool = False,
                 allow_cpu_fallback: bool = True, share_weights: bool = False):
    """The decoder an artifact needs: LiteRT for a TFLite artifact, else ONNX Runtime on the
    static-shape graphs or the dynamic KV-cache graph. The one place that picks (the CLI, the
    bench, verify and the device's quality card open artifacts through it).

    ``providers`` / ``strict`` / ``allow_cpu_fallback`` choose ONNX Runtime's execution
    providers: a TFLite artifact has none to pick (LiteRT's CPU interpreter; a fallback runtime
    must pass the artifact's parity fixture first, ``open_litert_decoder``). ``share_weights``
    applies to static graphs (one session otherwise: nothing to share)."""
    if artifact.format == "tflite":
        from .litert_decoder import open_litert_decoder

        return open_litert_decoder(artifact, threads=threads)
    static = artifact.manifest.get("static")
    kwargs = dict(threads=threads, providers=providers, strict=strict,
                  allow_cpu_fallback=allow_cpu_fallback)
    if static:
        return StaticDecoder(artifact.root, static, share_weights=share_weights, **kwargs)
    from .onnx_decoder import OnnxDecoder

    return OnnxDecoder(artifact.model_path, **kwargs)
