"""A KV-cache decoder on an ONNX Runtime session (no torch).

The graph contract (what ``slmedge export`` writes, and what Optimum's
``text-generation-with-past`` exports also follow)::

    inputs : input_ids [batch, seq] int64, attention_mask [batch, past+seq] int64,
             position_ids [batch, seq] int64 (optional),
             past_key_values.{i}.key / .value [batch, kv_heads, past, head_dim]
    outputs: logits [batch, seq, vocab], present.{i}.key / .value [batch, kv_heads, past+seq, head_dim]

The KV cache never leaves ONNX Runtime between steps: ``present`` outputs are bound
as ``OrtValue`` and fed back as the next step's ``past`` through IOBinding, so no
step copies the cache into numpy.

A fused graph (``slmedge export`` default: ``com.microsoft.GroupQueryAttention``, metadata
``slmedge.kv_cache = shared_buffer``) has the same inputs plus ``logits_to_keep`` (int64
scalar: 0 = logits of every fed position, k = the last k); its cache is one preallocated
buffer per layer bound as both past and present (``runtimes.sessions.kv_buffer``), which GQA
writes in place.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from slmedge.runtimes.errors import ArtifactError, UsageError
from .kv_buffer import (BATCH_PADDING_METADATA, SharedKVBuffer, check_sequence_length,
                        model_max_length, shared_kv_max_length)
from .providers import create_session, placement_of

_PAST_RE = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}

# ONNX Runtime raises these pybind exception types for unreadable or invalid models.
_ORT_LOAD_ERRORS = tuple(
    getattr(ort.capi.onnxruntime_pybind11_state, name)
    for name in ("InvalidProtobuf", "Fail", "InvalidGraph", "NoSuchFile", "InvalidArgument",
                 "NotImplemented", "RuntimeException")
    if hasattr(ort.capi.onnxruntime_pybind11_state, name)
)

ProviderSpec = tuple[str, dict]


@dataclass(frozen=True)
class KVLayout:
    """Shape facts of the KV cache, read from the graph's inputs."""

    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: type


def release_free_heap() -> bool:
    """Return the C heap's free pages to the system (glibc ``malloc_trim(0)``); ``False``
    where there is no such call (macOS, musl, Android's bionic).

    Building a session frees a lot: the parsed model's initializers once they are copied,
    and every weight that MLAS pre-packed. glibc keeps those pages mapped, so without this
    the resident size after load stays ~230 MB above the live data for SmolLM2-135M fp32."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    trim(0)
    return True


_MADV_DONTNEED = 4  # Linux (and Android): drop the pages; a clean file page is re-read on use


def release_mapped_weights(directory: str | Path) -> int:
    """Drop from this process's resident set the pages of files under ``directory`` that are
    memory-mapped and unmodified (Linux ``madvise(MADV_DONTNEED)``); returns the bytes of
    the mappings released (0 where there is no ``/proc/self/smaps``: macOS).

    ONNX Runtime memory-maps a model's external data and reads every weight it pre-packs;
    weights it keeps as stored (a lookup table that is also the pre-packed ``lm_head``'s
    input) stay mapped with all their pages resident though a lookup touches a few rows.
    A mapping with no private (copy-on-write) page holds only the file's bytes, so dropping
    its pages loses nothing: the next read faults the row back in from the page cache.
    Mappings with a written page are left alone."""
    import ctypes
    import ctypes.util

    smaps = Path("/proc/self/smaps")
    if not smaps.exists():
        return 0
    prefix = str(Path(directory).resolve()) + "/"
    regions, current = [], None
    with open(smaps) as f:
        for line in f:
            head = line.split(None, 5)
            if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                path = head[5].strip() if len(head) == 6 else ""
                start, end = (int(x, 16) for x in head[0].split("-"))
                current = [start, end, path.startswith(prefix) and "x" not in head[1], 0]
                regions.append(current)
            elif current is not None and head[0] == "Anonymous:":  # copy-on-write pages
                current[3] += int(head[1])
    clean = [(s, e) for s, e, ours, private_kb in regions if ours and private_kb == 0]
    if not clean:
        return 0
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        advise = libc.madvise
    except (OSError, AttributeError):
        return 0
    advise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    advise.restype = ctypes.c_int
    return sum(e - s for s, e in clean if advise(s, e - s, _MADV_DONTNEED) == 0)


def make_session(
    model_path: str | Path,
    *,
    threads: int | None = None,
    providers: Sequence[ProviderSpec] | None = None,
    session_options: ort.SessionOptions | None = None,
    strict: bool = False,
    allow_cpu_fallback: bool = True,
) -> ort.InferenceSession:
    """Create an ``InferenceSession`` with clear errors for a bad file or a missing provider.

    Providers are tried in order (``runtimes.sessions.providers``): a missing one falls back to the
    next with a notice on stderr; ``strict`` makes any fallback an error. Once the session
    exists, the C heap's freed pages go back to the system (:func:`release_free_heap`), and
    so do the resident pages of the model's memory-mapped weights
    (:func:`release_mapped_weights`)."""
    model_path = Path(model_path)

    def options() -> ort.SessionOptions:
        # Fresh per attempt: a provider added to SessionOptions cannot be taken out again.
        opts = session_options or ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        return opts

    try:
        session = create_session(
            model_path, list(providers or [("CPUExecutionProvider", {})]), options,
            strict=strict, allow_cpu_fallback=allow_cpu_fallback,
        )
        release_free_heap()
        release_mapped_weights(model_path.parent)
        return session
    except _ORT_LOAD_ERRORS as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(
            f"ONNX Runtime could not load {model_path}: {first[:300]} — the file is corrupt, "
            "truncated or not an ONNX model; export it again"
        ) from None


class OnnxDecoder:
    """Runs a decoder graph with a KV cache held in ORT values between calls."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        threads: int | None = None,
        providers: Sequence[ProviderSpec] | None = None,
        session_options: ort.SessionOptions | None = None,
        strict: bool = False,
        allow_cpu_fallback: bool = True,
    ):
        self.model_path = Path(model_path)
        self.session = make_session(
            model_path, threads=threads, providers=providers, session_options=session_options,
            strict=strict, allow_cpu_fallback=allow_cpu_fallback,
        )
        self.placement = placement_of(self.session)  # which provider runs how many nodes
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        for required in ("input_ids", "attention_mask"):
            if required not in inputs:
                raise ArtifactError(
                    f"{model_path} has no '{required}' input (inputs: {sorted(inputs)}); "
                    "it is not a decoder exported by slmedge or Optimum"
                )
        if "logits" not in outputs:
            raise ArtifactError(f"{model_path} has no 'logits' output (outputs: {outputs})")
        past = sorted(
            (int(m.group(1)), m.group(2), n) for n in inputs if (m := _PAST_RE.match(n))
        )
        self.past_names = [n for _, _, n in past]
        self.present_names = [n.replace("past_key_values", "present") for n in self.past_names]
        absent = [n for n in self.present_names if n not in outputs]
        if absent:
            raise ArtifactError(f"{model_path} lacks KV-cache outputs {absent[:4]}")
        self.has_position_ids = "position_ids" in inputs
        if self.past_names:
            shape = inputs[self.past_names[0]].shape
            dtype = _ORT_TYPES.get(inputs[self.past_names[0]].type, np.float32)
            heads, head_dim = _kv_dims(shape, Path(model_path))
            self.kv = KVLayout(len(self.past_names) // 2, heads, head_dim, dtype)
        else:
            self.kv = KVLayout(0, 0, 0, np.float32)
        logits_info = self.session.get_outputs()[outputs.index("logits")]
        vocab = logits_info.shape[-1]
        self.vocab_size = vocab if isinstance(vocab, int) else None
        self._logits_dtype = _ORT_TYPES.get(logits_info.type, np.float32)
        self._logits: tuple[np.ndarray, ort.OrtValue] | None = None  # bound logits buffer
        self._io = self.session.io_binding()
        self._past: list[ort.OrtValue] = []
        self._length = 0
        # A fused graph (GroupQueryAttention) keeps its cache in one preallocated buffer
        # bound as both past and present (runtimes.sessions.kv_buffer); it also takes
        # `logits_to_keep` (0 = every position, 1 = the last one only).
        self._shared = None
        self._bound_kv: tuple[int, int] | None = None  # the SharedKVBuffer allocation bound
        self.has_logits_to_keep = "logits_to_keep" in inputs
        max_length = shared_kv_max_length(self.session) if self.past_names else None
        if max_length is not None:
            self._shared = SharedKVBuffer(self.past_names, self.present_names, self.kv.kv_heads,
                                          self.kv.head_dim, self.kv.dtype, max_length,
                                          model_max_length=model_max_length(self.session))
        meta = self.session.get_modelmeta().custom_metadata_map
        #: rows of different lengths decode as one batch (:meth:`decode_batch`): a fused graph
        #: whose attention masks each row from its own length (right padding exact)
        self.batches_rows = (self._shared is not None and self.vocab_size is not None
                             and meta.get(BATCH_PADDING_METADATA) == "right")
        self.reset()

    @property
    def length(self) -> int:
        """Tokens held in the KV cache."""
        return self._length

    def providers(self) -> list[str]:
        return self.session.get_providers()

    @property
    def max_sequence_length(self) -> int | None:
        """Positions a fused graph covers (``slmedge.max_sequence_length``: its rotary
        tables and KV cache; capped at export by ``--max-context``); None for a plain graph."""
        return self._shared.max_length if self._shared is not None else None

    def check_length(self, total: int) -> None:
        """Refuse (UsageError naming the cap and the fix) a sequence of ``total`` tokens
        longer than a fused graph covers (``slmedge.max_sequence_length``: its rotary tables
        and KV cache); a plain graph has no such limit."""
        if self._shared is not None:
            check_sequence_length(total, self._shared.max_length, self._shared.model_max_length)

    def reset(self) -> None:
        """Forget the cached sequence; the next :meth:`step` starts a new one."""
        if self._shared is not None:  # stale entries past `length` are never read
            self._length = 0
            return
        empty = np.zeros((1, self.kv.kv_heads, 0, self.kv.head_dim), dtype=self.kv.dtype)
        self._past = [ort.OrtValue.ortvalue_from_numpy(empty) for _ in self.past_names]
        self._length = 0

    def step(self, token_ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Feed tokens after the cached ones; return the logits of the last one ``[vocab]``
        (or of every fed token, ``[n, vocab]``, when ``all_logits``)."""
        n = len(token_ids)
        if n == 0:
            raise ValueError("step() needs at least one token")
        total = self._length + n
        io = self._io
        self._bind_feeds(io, np.asarray(token_ids, dtype=np.int64).reshape(1, n),
                         np.ones((1, total), dtype=np.int64),
                         np.arange(self._length, total, dtype=np.int64).reshape(1, n), all_logits)
        own_logits = self._shared is not None and self.vocab_size is not None
        if own_logits:
            # Logits land in an array of ours: no io.get_outputs(), which wraps every output
            # (the whole KV cache) in new OrtValues on each call. The one-position buffer of a
            # decode step is reused and stays bound; longer ones are made per call.
            rows = 1 if self.has_logits_to_keep and not all_logits else n
            if self._logits is None or self._logits[0].shape[1] != rows or rows != 1:
                array = np.empty((1, rows, self.vocab_size), dtype=self._logits_dtype)
                value = ort.OrtValue.ortvalue_from_numpy(array)
                io.bind_ortvalue_output("logits", value)
                self._logits = (array, value)
        else:
            io.bind_output("logits", "cpu")
        if self._shared is not None:
            self._shared.ensure(total, self._length)
            allocation = (id(self._shared), self._shared.generation)
            if self._bound_kv != allocation:
                # An IOBinding keeps its bindings between runs: 2 x layers bind calls per
                # token cost more than the small ops of a decode step.
                self._shared.bind(io)
                self._bound_kv = allocation
        else:
            for name, value in zip(self.past_names, self._past, strict=True):
                io.bind_ortvalue_input(name, value)
            for name in self.present_names:
                io.bind_output(name, "cpu")
        self.session.run_with_iobinding(io)
        self._length = total
        if own_logits:
            logits = self._logits[0][0]
            if rows == 1:  # the reused buffer: the caller gets its own copy
                return logits.copy() if all_logits else logits[-1].copy()
            return logits if all_logits else logits[-1]
        outs = io.get_outputs()
        if self._shared is None:
            self._past = list(outs[1:])
        logits = outs[0].numpy()[0]
        return logits if all_logits else logits[-1]

    def decode_batch(self, prompts: Sequence[Sequence[int]], new_tokens: int,
                     forced: Sequence[Sequence[int]] | None = None,
                     ) -> tuple[list[list[int]], list[np.ndarray]]:
        """Decode ``new_tokens`` after each prompt, all prompts as one batch: returns each
        prompt's tokens and its logits before each of them (``[new_tokens, vocab]`` float32).
        The tokens are the greedy ones (argmax), or ``forced[b]`` when given (fed whatever the
        logits say, as a teacher-forced candidate). Only where :attr:`batches_rows`.

        Each prompt is prefilled on its own row of a ``[B, ...]`` cache; then every decode step
        feeds ``[B, 1]`` with row ``b``'s mask covering its own length, right-padded, and GQA
        writes its token at that length (``seqlens_k = sum(attention_mask) - 1`` per row).
        Each row's matrix products are its own, so the tokens are those of one prompt at a time
        and so are the logits: bit-identical for int4 (SmolLM2, Qwen2.5-0.5B), within fp32
        rounding for an fp32 graph (a 6-row product rounds differently from a 1-row one:
        SmolLM2 fp32 up to 1.7e-5). The batch reads each weight once per step for all rows
        instead of once per row. The decoder's own
        cache is untouched (its length is reset to 0)."""
        if not self.batches_rows:
            raise UsageError(
                f"{self.model_path} cannot decode a batch of rows of different lengths (it needs "
                f"a fused graph with metadata {BATCH_PADDING_METADATA} = right); decode the "
                "prompts one at a time with step()")
        rows = len(prompts)
        lengths = np.array([len(p) for p in prompts], dtype=np.int64)
        if rows == 0 or new_tokens < 1 or lengths.min() < 1:
            raise ValueError(f"decode_batch needs prompts of at least one token and new_tokens "
                             f">= 1 (got lengths {lengths.tolist()}, new_tokens {new_tokens})")
        if forced is not None and [len(f) for f in forced] != [new_tokens] * rows:
            raise ValueError(f"forced tokens: {new_tokens} per prompt expected")
        longest = int(lengths.max())
        cache = SharedKVBuffer(self.past_names, self.present_names, self.kv.kv_heads,
                               self.kv.head_dim, self.kv.dtype, self._shared.max_length,
                               initial_capacity=longest + new_tokens - 1, batch=rows,
                               model_max_length=self._shared.model_max_length)
        cache.ensure(longest + new_tokens - 1, 0)  # the same error as step() past the maximum
        # Each prompt's prefill on its own row of the cache (a view: the batch axis is the
        # outermost), keeping its last position's logits only: a padded [rows, longest] prefill
        # computed the head at every position (0.5B: 6 x 15 rows of a 151,936-token head).
        last = np.empty((rows, self.vocab_size), dtype=np.float32)
        for b, prompt in enumerate(prompts):
            row_io = self.session.io_binding()
            for past, present, array in zip(cache.past_names, cache.present_names, cache.arrays):
                value = ort.OrtValue.ortvalue_from_numpy(array[b : b + 1])
                row_io.bind_ortvalue_input(past, value)
                row_io.bind_ortvalue_output(present, value)
            n = len(prompt)
            last[b] = self._run_batch(row_io, np.asarray([prompt]), np.ones((1, n)),
                                      np.arange(n)[None], all_logits=False)[0, -1]
        io = self.session.io_binding()
        cache.bind(io)
        tokens = [[] for _ in range(rows)]
        kept = np.empty((rows, new_tokens, last.shape[-1]), dtype=np.float32)
        for pos in range(new_tokens):
            kept[:, pos] = last
            for b in range(rows):
                tokens[b].append(int(forced[b][pos]) if forced is not None
                                 else int(np.argmax(last[b])))
            if pos + 1 == new_tokens:
                break
            # row b holds lengths[b] tokens; this step writes the next at that position
            total = np.arange(int(lengths.max()) + 1)[None] <= lengths[:, None]
            feed = np.array([[t[-1]] for t in tokens], dtype=np.int64)
            last = self._run_batch(io, feed, total, lengths[:, None], all_logits=False)[:, 0]
            lengths = lengths + 1
        self.reset()
        return tokens, list(kept)

    def _bind_feeds(self, io: ort.IOBinding, ids: np.ndarray, mask: np.ndarray,
                    positions: np.ndarray, all_logits: bool) -> None:
        """The graph's inputs other than the KV cache, for :meth:`step` and a batch."""
        io.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        io.bind_cpu_input("attention_mask", np.ascontiguousarray(mask, dtype=np.int64))
        if self.has_position_ids:
            io.bind_cpu_input("position_ids", np.ascontiguousarray(positions, dtype=np.int64))
        if self.has_logits_to_keep:
            io.bind_cpu_input("logits_to_keep", np.array(0 if all_logits else 1, dtype=np.int64))

    def _run_batch(self, io: ort.IOBinding, ids: np.ndarray, mask: np.ndarray,
                   positions: np.ndarray, all_logits: bool) -> np.ndarray:
        self._bind_feeds(io, ids, mask, positions, all_logits)
        keep = ids.shape[1] if all_logits or not self.has_logits_to_keep else 1
        out = np.empty((ids.shape[0], keep, self.vocab_size), dtype=self._logits_dtype)
        io.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(out))
        self.session.run_with_iobinding(io)
        if not all_logits and keep != 1:
            out = out[:, -1:]
        return out.astype(np.float32, copy=False)

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Logits ``[n, vocab]`` of a sequence from scratch (the cache is reset first)."""
        self.reset()
        try:
            return self.step(token_ids, all_logits=True)
        finally:
            self.reset()


def _kv_dims(shape, model_path: Path) -> tuple[int, int]:
    """(kv_heads, head_dim) of a past input [batch, heads, past, head_dim]. Graphs that name
    these dims symbolically (ONNX Runtime GenAI 0.18's builder: ``kv_cache_dim``) are
    resolved from the ``config.json`` (or GenAI's ``genai_config.json``) beside the model."""
    heads, head_dim = shape[1], shape[3]
    if isinstance(heads, int) and isinstance(head_dim, int):
        return heads, head_dim
    config_path = model_path.parent / "config.json"
    genai_path = model_path.parent / "genai_config.json"
    try:
        if config_path.is_file():
            config = json.loads(config_path.read_text())
            kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
            size = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        else:  # a GenAI model directory
            decoder = json.loads(genai_path.read_text())["model"]["decoder"]
            kv_heads, size = decoder["num_key_value_heads"], decoder["head_size"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArtifactError(
            f"{model_path}: the KV-cache inputs name their sizes symbolically ({shape}) and "
            f"neither {config_path.name} nor {genai_path.name} beside it gives them ({e!r}); "
            "put the model's config.json beside it"
        ) from None
    heads = heads if isinstance(heads, int) else int(kv_heads)
    head_dim = head_dim if isinstance(head_dim, int) else int(size)
    return heads, head_dim
