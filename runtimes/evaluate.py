"""Perplexity with overlapping windows (no torch).

Windows of ``window`` tokens advance by ``stride``; the first window scores every
prediction it makes, each later window only the tokens no earlier window scored (its
last ``stride``), so every token after the first is scored exactly once, with at
least ``window - stride`` tokens of context after the first window.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Window:
    begin: int  # first token fed
    end: int  # one past the last token fed
    score_from: int  # first target index scored (targets score_from .. end-1)


def plan_windows(n_tokens: int, window: int = 512, stride: int = 256) -> list[Window]:
    """The windows that cover ``n_tokens`` tokens."""
    if window < 2 or not 0 < stride <= window:
        raise ValueError(f"need window >= 2 and 0 < stride <= window, got {window}, {stride}")
    plans: list[Window] = []
    prev_end = 0
    for begin in range(0, max(n_tokens - 1, 1), stride):
        end = min(begin + window, n_tokens)
        plans.append(Window(begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return plans


def token_nll(logits: np.ndarray, targets: np.ndarray, chunk: int = 64) -> np.ndarray:
    """Negative log-likelihood of each target under its row of logits (float64), ``chunk``
    rows at a time: the float64 temporaries of a whole window were an export's memory peak
    (3 x 311 MB for 256 rows of a 151936-token vocabulary). Each row's value is the same."""
    targets = np.asarray(targets)
    out = np.empty(len(targets), dtype=np.float64)
    for i in range(0, len(targets), chunk):
        x = logits[i : i + chunk].astype(np.float64)
        m = x.max(axis=-1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=-1))
        out[i : i + chunk] = lse - x[np.arange(len(x)), targets[i : i + chunk]]
    return out


@dataclass
class PerplexityResult:
    perplexity: float
    mean_nll: float
    tokens: int  # tokens evaluated (the text's first ``tokens`` tokens)
    scored: int  # predictions scored (tokens - 1)
    windows: int
    window: int
    stride: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def perplexity(
    logits_fn: Callable[[Sequence[int]], np.ndarray],
    token_ids: Sequence[int],
    *,
    window: int = 512,
    stride: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    """Perplexity of ``token_ids`` under ``logits_fn(ids) -> [len(ids), vocab]``."""
    ids = np.asarray(token_ids, dtype=np.int64)
    if len(ids) < 2:
        raise ValueError(f"need at least 2 tokens to score, got {len(ids)}")
    plans = plan_windows(len(ids), window, stride)
    total, count = 0.0, 0
    t0 = time.perf_counter()
    for k, w in enumerate(plans):
        logits = logits_fn(ids[w.begin : w.end].tolist())
        rows = logits[w.score_from - 1 - w.begin : w.end - 1 - w.begin]
        nll = token_nll(rows, ids[w.score_from : w.end])
        total += float(nll.sum())
        count += len(nll)
        if progress:
            progress(k + 1, len(plans))
    mean = total / count
    return PerplexityResult(
        perplexity=math.exp(mean),
        mean_nll=mean,
        tokens=len(ids),
        scored=count,
        windows=len(plans),
        window=window,
        stride=stride,
        seconds=time.perf_counter() - t0,
    )
