"""Quantization with ONNX Runtime's tools: int4 / int8 weight-only (MatMulNBits), int8
dynamic, static QDQ int8 and a16w8, calibrated on real text with real KV-cache states.

Library entry points:

* :func:`quantize_model` — one ONNX decoder graph -> quantized graph, by a :class:`QuantRecipe`;
* :func:`quantize_a16w8` — the NPU recipe (16-bit activations, 8-bit weights, QDQ), for
  device profiles such as ``android-qnn-htp``;
* :func:`quantize_artifact` / :func:`quantize_in_stage` — the same on artifacts, with the
  quality card and the perplexity gate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .recipe import (
    CalibrationConfig,
    CalibrationMethod,
    Int4Algorithm,
    Int8Format,
    QuantRecipe,
    QuantScheme,
    TensorPrecision,
)

if TYPE_CHECKING:
    from .core import QuantReport

__all__ = [
    "CalibrationConfig", "CalibrationMethod", "Int4Algorithm", "Int8Format", "QuantRecipe",
    "QuantReport", "QuantScheme", "TensorPrecision", "quantize_a16w8", "quantize_model",
]


def __getattr__(name: str):
    # onnx (the [export] extra) is imported only when quantization is used, so that the
    # `slmedge` parser, which registers `slmedge quantize`, works on a runtime-only install.
    if name in ("quantize_model", "QuantReport"):
        from . import core

        return getattr(core, name)
    raise AttributeError(name)


def quantize_a16w8(
    src: str | Path,
    dst: str | Path,
    *,
    calibration_text: str | Path | None = None,
    calibration_ids: Sequence[int] | None = None,
    tokenizer_dir: str | Path | None = None,
    method: CalibrationMethod = CalibrationMethod.minmax,
    per_channel: bool = True,
    samples: int = 32,
    progress: Callable[[str], None] | None = None,
) -> QuantReport:
    """QDQ with uint16 activations and int8 weights, for NPUs (QNN HTP).

    Weight MatMuls, the norms' weight Mul, gating and data movement get 16-bit activations;
    the residual stream (residual Adds, the norms reading it and their statistics), the rotary
    angle and the attention-mask path (mask arithmetic, the mask Add, Softmax) stay float — see
    ``static.OP_POLICY``; the report's ``op_decisions`` lists every op type. Calibration:
    ``calibration_ids``, or ``calibration_text`` (default: the packaged calibration book)
    tokenized with the tokenizer in ``tokenizer_dir`` (default: the model's directory).
    """
    decode = max(samples - samples // 4, 0)
    recipe = QuantRecipe(
        scheme=QuantScheme.a16w8,
        per_channel=per_channel,
        calibration=CalibrationConfig(text=calibration_text, method=method,
                                      prefill_samples=max(samples - decode, 1),
                                      decode_samples=decode),
    )
    from .core import quantize_model

    return quantize_model(src, dst, recipe, tokenizer_dir=tokenizer_dir,
                          calibration_ids=calibration_ids, say=progress)
