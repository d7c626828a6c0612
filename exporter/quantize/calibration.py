"""Calibration data for static quantization: real text, real KV-cache states.

A decoder runs in two regimes: a prompt fed at once with an empty cache, and one token
at a time on a long cache. Activation ranges differ between them (the attention of a
decode step sees hundreds of keys), so the reader feeds both:

* prefill samples: ``prefill_tokens`` consecutive tokens of the calibration text, empty
  past;
* decode samples: one token whose ``past_key_values`` are what the fp32 model itself
  produced for the text before it, with cache lengths spread over ``1 .. max_past``.

The past states come from running the fp32 graph over the text (one prefill per
passage; a causal model's first ``p`` cache entries do not depend on later tokens, so
one prefill yields caches of every shorter length). No torch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader

from slmedge.runtimes.errors import UsageError
from slmedge.runtimes.texts import default_calibration_text

from .recipe import CalibrationConfig

#: The calibration text shipped in the package (runtimes/data; a different book from the
#: evaluation text).
DEFAULT_CALIBRATION_TEXT = default_calibration_text()


def calibration_text(config: CalibrationConfig) -> Path:
    """The calibration text file to use, with a clear error when there is none."""
    path = Path(config.text) if config.text else DEFAULT_CALIBRATION_TEXT
    if not path.is_file():
        raise UsageError(
            f"calibration text '{path}' not found; pass --calibration FILE (any UTF-8 text "
            "in the model's language, a few thousand tokens or more)"
        )
    return path


class KVCacheCalibrationReader(CalibrationDataReader):
    """Feeds prefill and decode samples with realistic caches (see the module docstring).

    Samples are made lazily, one passage at a time, so memory stays at one cache.
    ``materialize()`` returns them all in a list-backed reader for consumers that copy
    or re-read the reader (ORT's GPTQ).
    """

    def __init__(self, model_path: str | Path, token_ids: Sequence[int], config: CalibrationConfig,
                 *, threads: int | None = None):
        self.config = config
        self.ids = np.asarray(token_ids, dtype=np.int64)
        need = max(config.prefill_tokens, min(config.max_past, 16) + 1)
        if len(self.ids) < need:
            raise UsageError(
                f"the calibration text has {len(self.ids)} tokens; need at least {need} "
                f"(prefill_tokens={config.prefill_tokens}); give a longer text"
            )
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.present_names = [n.replace("past_key_values", "present") for n in self.past_names]
        self.has_position_ids = "position_ids" in inputs
        # A fused graph takes `logits_to_keep`; 0 keeps every position, so the lm_head sees
        # as many activations as in an unfused graph.
        self.has_logits_to_keep = "logits_to_keep" in inputs
        first = inputs[self.past_names[0]] if self.past_names else None
        self.kv_heads = int(first.shape[1]) if first is not None else 0
        self.head_dim = int(first.shape[3]) if first is not None else 0
        self.kv_dtype = np.float16 if first is not None and first.type == "tensor(float16)" else np.float32
        self._iter: Iterator[dict] | None = None

    # -- samples --------------------------------------------------------------------------

    def _feed(self, ids: np.ndarray, past: list[np.ndarray] | None, start: int) -> dict:
        n = len(ids)
        feed = {
            "input_ids": ids.reshape(1, n),
            "attention_mask": np.ones((1, start + n), dtype=np.int64),
        }
        if self.has_position_ids:
            feed["position_ids"] = np.arange(start, start + n, dtype=np.int64).reshape(1, n)
        if self.has_logits_to_keep:
            feed["logits_to_keep"] = np.array(0, dtype=np.int64)
        if past is None:
            empty = np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=self.kv_dtype)
            past = [empty] * len(self.past_names)
        feed.update(dict(zip(self.past_names, past, strict=False)))
        return feed

    def samples(self) -> Iterator[dict]:
        """Every calibration sample, in a fixed order for a given seed."""
        cfg = self.config
        rng = np.random.default_rng(cfg.seed)
        n = len(self.ids)
        for _ in range(cfg.prefill_samples):
            start = int(rng.integers(0, n - cfg.prefill_tokens + 1))
            yield self._feed(self.ids[start : start + cfg.prefill_tokens], None, 0)
        if not cfg.decode_samples or not self.past_names:
            return
        max_past = min(cfg.max_past, n - 1)
        # A few passages, several cache lengths each: lengths spread from short to max_past.
        lengths = np.sort(rng.integers(1, max_past + 1, cfg.decode_samples))
        per_passage = 8
        for group in range(0, len(lengths), per_passage):
            chunk = lengths[group : group + per_passage]
            longest = int(chunk.max())
            start = int(rng.integers(0, n - longest))
            ids = self.ids[start : start + longest]
            outs = self.session.run(self.present_names, self._feed(ids, None, 0))
            for p in chunk:
                p = int(p)
                past = [np.ascontiguousarray(o[:, :, :p, :]) for o in outs]
                yield self._feed(self.ids[start + p : start + p + 1], past, p)

    def __len__(self) -> int:
        return self.config.prefill_samples + (self.config.decode_samples if self.past_names else 0)

    def close(self) -> None:
        """Free the whole graph's session (its weights and arena); samples() then fails."""
        self.session = None

    # -- CalibrationDataReader ---------------------------------------------------------------

    def get_next(self) -> dict | None:
        if self._iter is None:
            self._iter = self.samples()
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = None

    def materialize(self) -> ListCalibrationReader:
        return ListCalibrationReader(list(self.samples()))


class ListCalibrationReader(CalibrationDataReader):
    """A reader over samples held in memory (copyable, re-readable)."""

    def __init__(self, samples: list[dict]):
        self.data = samples
        self.pos = 0

    def get_next(self) -> dict | None:
        if self.pos >= len(self.data):
            return None
        self.pos += 1
        return self.data[self.pos - 1]

    def rewind(self) -> None:
        self.pos = 0

    def __iter__(self):
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)
