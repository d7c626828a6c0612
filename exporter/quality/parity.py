"""The parity gate: the exported graph must give PyTorch's logits.

Same tokens through PyTorch (with its own KV cache) and through the artifact on ONNX
Runtime (slmedge's runtime, so the gate tests what users run): a prefill and a few
one-token decode steps; the largest absolute logit difference must stay within the
architecture's tolerance. The comparison itself is :mod:`.compare`'s (shared with the
static-shape and TFLite flows); this module holds the PyTorch side: the reference decoder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from slmedge.runtimes.sessions.onnx_decoder import OnnxDecoder

from .compare import FP16_RTOL_OF_SCALE, ParityResult, Tolerance, compare_decoders, step_logits
from slmedge.exporter.quality.memory import release_memory

__all__ = ["FP16_RTOL_OF_SCALE", "ParityResult", "TorchDecoder", "check_parity", "torch_step_logits"]


def torch_step_logits(model, token_ids: list[int], decode_steps: list[int]) -> list[np.ndarray]:
    """PyTorch logits for a prefill and then each decode token, with HF's own cache."""
    return step_logits(TorchDecoder(model), token_ids, decode_steps)


def check_parity(
    model,
    onnx_path: Path,
    *,
    atol: float,
    rtol: float = 0.0,
    fp16: bool = False,
    prefill_tokens: int = 8,
    decode_steps: int = 3,
    seed: int = 0,
    open_decoder=None,
) -> ParityResult:
    """Compare PyTorch and ONNX Runtime logits on a prefill plus ``decode_steps`` steps
    (:func:`.compare.compare_decoders`).

    Passes when max |diff| <= ``atol + rtol * max|logit|`` (fp16: at least 2% of the scale).
    ``model`` may be a zero-argument callable returning the model: it is then loaded for the
    PyTorch logits and released before ONNX Runtime loads the graph, so the two never share
    memory (streaming export of a large model). ``open_decoder``: a zero-argument callable
    returning the graph's decoder (the export opens one session for the gate and the quality
    card); default: a new :class:`OnnxDecoder` of ``onnx_path``."""
    rng = np.random.default_rng(seed)
    loader = model if callable(model) and not isinstance(model, torch.nn.Module) else None
    if loader is not None:
        model = loader()
    vocab = model.config.vocab_size
    prompt = rng.integers(0, vocab, prefill_tokens).tolist()
    steps = rng.integers(0, vocab, decode_steps).tolist()
    ref = torch_step_logits(model, prompt, steps)
    if loader is not None:
        del model
        release_memory()
    decoder = open_decoder() if open_decoder is not None else OnnxDecoder(onnx_path)
    return compare_decoders(decoder, ref, prompt, steps, Tolerance.for_dtype(atol, rtol, fp16=fp16))


class TorchDecoder:
    """A PyTorch causal LM behind the runtime's decoder protocol (``reset`` / ``step``, as
    :class:`~slmedge.runtimes.sessions.static_decoder.StaticDecoder`), with HF's own KV cache: the
    reference of a quality card computed by ``static_shapes_qdq.static_quality``. ``context`` is
    the window the card is confined to (the static graphs'); PyTorch itself has none
    (None: no window, for parity)."""

    def __init__(self, model, context: int | None = None):
        self.model = model
        self.context = None if context is None else int(context)
        self._cache = None

    def reset(self) -> None:
        self._cache = None

    def step(self, token_ids, all_logits: bool = False) -> np.ndarray:
        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([list(token_ids)]),
                             past_key_values=self._cache, use_cache=True)
        self._cache = out.past_key_values
        logits = out.logits[0].float().numpy()
        return logits if all_logits else logits[-1]

    def logits(self, token_ids) -> np.ndarray:
        """Logits ``[n, vocab]`` of a sequence from scratch."""
        self.reset()
        try:
            return self.step(token_ids, all_logits=True)
        finally:
            self.reset()
