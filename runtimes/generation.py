"""The generation loop: prefill, then one token at a time, greedy or sampled.

Works on any decoder with ``reset()`` and ``step(ids) -> logits`` (ONNX Runtime today,
LiteRT later). Timestamps are taken on the way (a ``perf_counter`` call per token) so
that the benchmark runner and ``generate`` share one loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


class Decoder(Protocol):
    """What the loop needs from a runtime session."""

    def reset(self) -> None: ...

    def step(self, token_ids: Sequence[int], all_logits: bool = False) -> np.ndarray: ...

    # optional: ``check_length(total)`` raises when the graph covers fewer than ``total``
    # positions (OnnxDecoder: a fused graph's slmedge.max_sequence_length)


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. ``temperature == 0`` means greedy (argmax)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Picks the next token from logits according to a :class:`SamplingConfig`."""

    def __init__(self, config: SamplingConfig):
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray) -> int:
        cfg = self.config
        if cfg.greedy:
            return int(np.argmax(logits))
        scores = logits.astype(np.float64) / cfg.temperature
        candidates = np.arange(scores.shape[-1])
        if cfg.top_k and cfg.top_k < scores.shape[-1]:
            candidates = np.argpartition(-scores, cfg.top_k - 1)[: cfg.top_k]
        order = candidates[np.argsort(-scores[candidates], kind="stable")]
        probs = np.exp(scores[order] - scores[order[0]])
        probs /= probs.sum()
        if cfg.top_p < 1.0:
            # Keep the smallest prefix whose mass reaches top_p (at least one token).
            keep = int(np.searchsorted(np.cumsum(probs), cfg.top_p) + 1)
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        return int(order[self.rng.choice(len(order), p=probs)])


@dataclass
class GenerationResult:
    """Generated ids and text, why it stopped, and the timestamps taken on the way."""

    tokens: list[int]
    text: str
    prompt_tokens: int
    stop_reason: str  # "eos" | "length"
    ttft_s: float  # prefill + first token
    step_s: list[float] = field(default_factory=list)  # each later token's latency

    @property
    def decode_tokens_per_s(self) -> float:
        total = sum(self.step_s)
        return len(self.step_s) / total if total > 0 else 0.0


def generate(
    decoder: Decoder,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    sampling: SamplingConfig = SamplingConfig(),
    stop_ids: set[int] | frozenset[int] = frozenset(),
    tokenizer=None,
    on_text: Callable[[str], None] | None = None,
) -> GenerationResult:
    """Generate up to ``max_new_tokens`` after ``prompt_ids``.

    Stops at a token in ``stop_ids`` (not included in the output) or at the limit.
    With a ``tokenizer``, the text is decoded incrementally and ``on_text`` receives
    each new piece as soon as it is complete.
    """
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    check_length = getattr(decoder, "check_length", None)
    if check_length is not None:
        # Before the prefill: the last generated token is sampled, never fed, hence the -1.
        # Refused up front rather than after some tokens were streamed.
        check_length(len(prompt_ids) + max_new_tokens - 1)
    sample = Sampler(sampling)
    stream = tokenizer.stream() if tokenizer is not None else None
    pieces: list[str] = []
    tokens: list[int] = []
    step_s: list[float] = []
    decoder.reset()
    t0 = time.perf_counter()
    logits = decoder.step(prompt_ids)
    token = sample(logits)
    t_prev = time.perf_counter()
    ttft = t_prev - t0
    stop_reason = "length"
    while True:
        if token in stop_ids:
            stop_reason = "eos"
            break
        tokens.append(token)
        if stream is not None:
            piece = stream.push(token)
            if piece:
                pieces.append(piece)
                if on_text:
                    on_text(piece)
        if len(tokens) >= max_new_tokens:
            break
        logits = decoder.step([token])
        token = sample(logits)
        now = time.perf_counter()
        step_s.append(now - t_prev)
        t_prev = now
    text = "".join(pieces)
    return GenerationResult(tokens, text, len(prompt_ids), stop_reason, ttft, step_s)
