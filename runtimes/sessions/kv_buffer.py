"""One preallocated KV cache shared between a fused graph's past inputs and present outputs.

A graph fused by ``slmedge.exporter.passes`` runs attention in
``com.microsoft.GroupQueryAttention``. When ``past_key_values.N.*`` and ``present.N.*``
are bound to the *same* buffer ``[1, kv_heads, capacity, head_dim]``, GQA writes the new
keys/values in place at positions ``length .. length+n-1`` (``seqlens_k`` and
``total_sequence_length`` come from the ``attention_mask`` the decoder feeds): no step
copies or concatenates the cache.

The graph says it wants this through its metadata (``slmedge.kv_cache = shared_buffer``,
``slmedge.max_sequence_length = N``: positions its rotary caches cover). The buffer starts
small and doubles when a sequence outgrows it (one copy of the filled part each time),
up to that maximum.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from slmedge.runtimes.errors import UsageError

SHARED_KV_METADATA = "slmedge.kv_cache"
MAX_LENGTH_METADATA = "slmedge.max_sequence_length"
#: the model's own maximum when the export capped the graph below it (``--max-context``)
MODEL_MAX_LENGTH_METADATA = "slmedge.model_max_sequence_length"
#: "right": the graph's attention masks itself from ``sum(attention_mask) - 1`` per row, exact
#: for right-padded rows of a batch (``OnnxDecoder.decode_batch``); "mask": the exporter's mask
#: goes in as GQA's attention_bias (left padding); absent: an older export, batch 1 only
BATCH_PADDING_METADATA = "slmedge.batch_padding"
INITIAL_CAPACITY = 256


def shared_kv_max_length(session: ort.InferenceSession) -> int | None:
    """The graph's maximum sequence length if it wants a shared KV buffer, else None."""
    meta = session.get_modelmeta().custom_metadata_map
    if meta.get(SHARED_KV_METADATA) != "shared_buffer":
        return None
    return int(meta.get(MAX_LENGTH_METADATA, "4096"))


def model_max_length(session: ort.InferenceSession) -> int | None:
    """The model's own maximum positions when the export capped the graph below it."""
    value = session.get_modelmeta().custom_metadata_map.get(MODEL_MAX_LENGTH_METADATA)
    return int(value) if value else None


def check_sequence_length(total: int, max_length: int, model_max: int | None = None) -> None:
    """Refuse a sequence of ``total`` tokens longer than the graph covers: its rotary tables
    hold ``max_length`` positions (GroupQueryAttention would read past them)."""
    if total <= max_length:
        return
    if model_max is not None and model_max > max_length:
        why = (f"the export capped it with --max-context {max_length}; the model allows "
               f"{model_max}")
        fix = (f"shorten the prompt, generate fewer tokens, or export again with a larger "
               f"--max-context (at most {model_max})")
    else:
        why = "the model's maximum"
        fix = "shorten the prompt or generate fewer tokens"
    raise UsageError(
        f"the sequence would be {total} tokens long (prompt + generated), but this artifact "
        f"covers at most {max_length} positions (slmedge.max_sequence_length: its rotary tables "
        f"and KV cache; {why}); {fix}")


class SharedKVBuffer:
    """Per-layer key/value buffers bound as both past input and present output."""

    def __init__(self, past_names: list[str], present_names: list[str], kv_heads: int,
                 head_dim: int, dtype, max_length: int, initial_capacity: int = INITIAL_CAPACITY,
                 batch: int = 1, model_max_length: int | None = None):
        self.batch = batch
        self.model_max_length = model_max_length
        self.past_names = past_names
        self.present_names = present_names
        self.kv_heads, self.head_dim, self.dtype = kv_heads, head_dim, dtype
        self.max_length = max_length
        self.capacity = 0
        self.generation = 0  # bumped on every (re)allocation: bindings made before are stale
        self.arrays: list[np.ndarray] = []
        self.values: list[ort.OrtValue] = []
        self._allocate(min(initial_capacity, max_length), keep=0)

    def _allocate(self, capacity: int, keep: int) -> None:
        shape = (self.batch, self.kv_heads, capacity, self.head_dim)
        arrays = []
        for old in self.arrays or [None] * len(self.past_names):
            new = np.zeros(shape, dtype=self.dtype)
            if old is not None and keep:
                new[:, :, :keep] = old[:, :, :keep]
            arrays.append(new)
        self.arrays = arrays
        # On the CPU an OrtValue made from a numpy array uses the array's memory: what GQA
        # writes into the bound present output is in self.arrays.
        self.values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
        self.capacity = capacity
        self.generation += 1

    def ensure(self, total: int, length: int) -> None:
        """Make room for ``total`` tokens, keeping the first ``length`` cached ones."""
        check_sequence_length(total, self.max_length, self.model_max_length)
        if total > self.capacity:
            capacity = self.capacity or INITIAL_CAPACITY
            while capacity < total:
                capacity *= 2
            self._allocate(min(capacity, self.max_length), keep=length)

    def bind(self, io: ort.IOBinding) -> None:
        for past, present, value in zip(self.past_names, self.present_names, self.values):
            io.bind_ortvalue_input(past, value)
            io.bind_ortvalue_output(present, value)
