"""The parity gate: the exported graph must give PyTorch's logits.

Same tokens through PyTorch (with its own KV cache) and through the artifact on ONNX
Runtime (slmedge's runtime, so the gate tests what users run): a prefill and a few
one-token decode steps; the largest absolute logit difference must stay within the
architecture's tolerance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from slmedge.runtimes.onnx_decoder import OnnxDecoder

from .quality import release_memory

# fp16 keeps ~3 significant digits; logits are compared relative to their scale.
FP16_RTOL_OF_SCALE = 2e-2


@dataclass
class ParityReport:
    max_abs_diff: float
    logit_scale: float
    atol: float
    prefill_tokens: int
    decode_steps: int
    argmax_agree: bool
    passed: bool

    def to_dict(self) -> dict:
        return asdict(self)


def torch_step_logits(model, token_ids: list[int], decode_steps: list[int]) -> list[np.ndarray]:
    """PyTorch logits for a prefill and then each decode token, with HF's own cache."""
    outs = []
    with torch.no_grad():
        ids = torch.tensor([token_ids])
        out = model(input_ids=ids, use_cache=True)
        outs.append(out.logits[0].float().numpy())
        cache = out.past_key_values
        for tok in decode_steps:
            out = model(input_ids=torch.tensor([[tok]]), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            outs.append(out.logits[0].float().numpy())
    return outs


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
) -> ParityReport:
    """Compare PyTorch and ONNX Runtime logits on a prefill plus ``decode_steps`` steps.

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
    decoder.reset()
    got = [decoder.step(prompt, all_logits=True).astype(np.float32)]
    for tok in steps:
        got.append(decoder.step([tok], all_logits=True).astype(np.float32))
    decoder.reset()
    diff = max(float(np.abs(a - b).max()) for a, b in zip(got, ref))
    scale = max(float(np.abs(r).max()) for r in ref)
    tol = atol + rtol * scale
    if fp16:
        tol = max(tol, FP16_RTOL_OF_SCALE * scale)
    agree = all(np.array_equal(a.argmax(-1), b.argmax(-1)) for a, b in zip(got, ref))
    return ParityReport(
        max_abs_diff=diff,
        logit_scale=scale,
        atol=tol,
        prefill_tokens=prefill_tokens,
        decode_steps=decode_steps,
        argmax_agree=agree,
        passed=diff <= tol,
    )


class TorchDecoder:
    """A PyTorch causal LM behind the runtime's decoder protocol (``reset`` / ``step``, as
    :class:`~slmedge.runtimes.static_decoder.StaticDecoder`), with HF's own KV cache: the
    reference of a quality card computed by ``static_shapes_qdq.static_quality``. ``context`` is
    the window the card is confined to (the static graphs'); PyTorch itself has none."""

    def __init__(self, model, context: int):
        self.model = model
        self.context = int(context)
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
