"""Quantize a converted ``.tflite`` with ai-edge-quantizer recipes (``--quant`` of the TFLite path).

The fp32 flatbuffer is converted once; each recipe is applied to it afterwards, so the
fp32 graph can serve as the quality card's reference and the quantized graph differs
from it only by the recipe.

Static (full-integer) quantization is limited to the ops where int8 holds for a decoder:
FULLY_CONNECTED (the projections) and BATCH_MATMUL (QK^T and AV). The attention-mask add
(-3.4e38 constants), SOFTMAX, the norms and the rotary arithmetic stay float: measured on
a tiny Llama, int8 everywhere collapses the logits (cosine 0.68) where FC-only keeps
0.998 (DESIGN.md). The manifest records this decision.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from slmedge.device_profiles.schema import QuantScheme

Say = Callable[[str], None]

#: Ops that get int8 activations with --quant int8-static, and the ones kept float, with why.
STATIC_INT8_OPS = ("FULLY_CONNECTED", "BATCH_MATMUL")
STATIC_FLOAT_OPS_WHY = (
    "ADD of the attention mask (-3.4e38 constants swamp an int8 range), SOFTMAX, the "
    "RMSNorm/LayerNorm arithmetic and the rotary MUL/ADD stay float32: int8 there destroys a "
    "decoder's logits; the projections and attention matmuls hold int8"
)


@dataclass
class TfliteQuantReport:
    """What was applied, for the manifest."""

    scheme: str
    recipe: list[dict] = field(default_factory=list)
    weight_bits: int | None = None
    granularity: str | None = None
    activations: str = "float32"
    static_int8_ops: list[str] = field(default_factory=list)
    float_ops_reason: str | None = None
    calibration: dict | None = None
    size_fp32_bytes: int = 0
    size_bytes: int = 0

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in (None, [], {})}


def _recipe(scheme: QuantScheme):
    """The ai-edge-quantizer recipe of a scheme, and its facts for the report."""
    from ai_edge_quantizer import algorithm_manager, qtyping, recipe_manager

    ops = qtyping.TFLOperationName
    gran = qtyping.QuantGranularity
    rm = recipe_manager.RecipeManager()
    facts: dict = {}
    if scheme is QuantScheme.fp16:
        rm.add_weight_only_config(
            ".*", ops.ALL_SUPPORTED, 16, algorithm_key=algorithm_manager.AlgorithmName.FLOAT_CASTING
        )
        facts = {"weight_bits": 16, "granularity": "float16"}
    elif scheme is QuantScheme.int8_weight:
        rm.add_weight_only_config(".*", ops.ALL_SUPPORTED, 8, gran.CHANNELWISE)
        facts = {"weight_bits": 8, "granularity": "channelwise"}
    elif scheme is QuantScheme.int8_dynamic:
        rm.add_dynamic_config(".*", ops.ALL_SUPPORTED, 8, gran.CHANNELWISE)
        facts = {
            "weight_bits": 8,
            "granularity": "channelwise",
            "activations": "int8, quantized per call (dynamic range)",
        }
    elif scheme is QuantScheme.int4_block32:
        # int4 blocks of 32 for the projections; the embedding gather keeps int8 channel-wise
        # (LiteRT's blockwise kernels are fully-connected ones).
        rm.add_dynamic_config(".*", ops.ALL_SUPPORTED, 8, gran.CHANNELWISE)
        rm.add_dynamic_config(".*", ops.FULLY_CONNECTED, 4, gran.BLOCKWISE_32)
        facts = {
            "weight_bits": 4,
            "granularity": "blockwise-32 (FULLY_CONNECTED); other weights int8 channel-wise",
            "activations": "int8, quantized per call",
        }
    elif scheme is QuantScheme.int8_static:
        for op in STATIC_INT8_OPS:
            rm.add_static_config(".*", getattr(ops, op), 8, 8, gran.CHANNELWISE)
        facts = {
            "weight_bits": 8,
            "granularity": "channelwise",
            "activations": "int8 calibrated (FULLY_CONNECTED, BATCH_MATMUL); float32 elsewhere",
            "static_int8_ops": list(STATIC_INT8_OPS),
            "float_ops_reason": STATIC_FLOAT_OPS_WHY,
        }
    else:
        raise ValueError(f"no recipe for {scheme.value}")
    return rm, facts


@contextlib.contextmanager
def _quiet():
    """ai-edge-quantizer prints reports and absl warnings on stdout; keep stdout for --json."""
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        logging.getLogger().setLevel(level)


def calibration_data(
    fp32_path: Path,
    token_ids: Sequence[int],
    *,
    samples: int,
    seed: int = 0,
    threads: int | None = None,
) -> dict[str, list[dict]]:
    """Signature inputs for calibration: prefill chunks of real text with an empty cache, and
    decode steps whose cache was filled by the fp32 graph itself (a realistic KV range)."""
    from slmedge.runtimes.sessions.litert_decoder import LiteRTDecoder

    decoder = LiteRTDecoder(fp32_path, threads=threads)
    rng = np.random.default_rng(seed)
    ids = np.asarray(token_ids, dtype=np.int32)
    data: dict[str, list[dict]] = {}
    n_prefill = max(1, samples // 4)
    for sig in decoder._prefill:  # noqa: SLF001  (same package family: the contract is ours)
        t = sig.tokens
        if len(ids) < t + 1:
            continue
        rows = []
        for _ in range(n_prefill):
            start = int(rng.integers(0, len(ids) - t))
            kv = {n: np.zeros(decoder.kv_shape, dtype=decoder.kv_dtype) for n in decoder.kv_names}
            rows.append(
                {
                    "tokens": ids[None, start : start + t],
                    "input_pos": np.arange(t, dtype=np.int32),
                    **kv,
                }
            )
        data[sig.name] = rows
    decode_rows = []
    max_past = min(decoder.context_length - 1, 256, len(ids) - 1)
    for _ in range(max(1, samples - n_prefill)):
        past = int(rng.integers(1, max_past + 1))
        start = int(rng.integers(0, len(ids) - past))
        decoder.reset()
        decoder.step(ids[start : start + past].tolist())
        kv = decoder.cache_arrays()
        decode_rows.append(
            {
                "tokens": ids[None, start + past : start + past + 1],
                "input_pos": np.asarray([past], dtype=np.int32),
                **kv,
            }
        )
    data["decode"] = decode_rows
    return data


def quantize_tflite(
    fp32: bytes,
    scheme: QuantScheme,
    *,
    fp32_path: Path | None = None,
    calib_ids: Sequence[int] = (),
    calib_samples: int = 16,
    threads: int | None = None,
    say: Say = lambda _m: None,
) -> tuple[bytes, TfliteQuantReport]:
    """Apply ``scheme`` to the fp32 flatbuffer; returns the new flatbuffer and the report."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from ai_edge_quantizer import quantizer

    rm, facts = _recipe(scheme)
    qt = quantizer.Quantizer(bytearray(fp32))
    qt.load_quantization_recipe(rm.get_quantization_recipe())
    report = TfliteQuantReport(scheme=scheme.value, recipe=rm.get_quantization_recipe(), **facts)
    calibration = None
    with _quiet():
        if qt.need_calibration:
            if fp32_path is None or not len(calib_ids):
                raise ValueError("static quantization needs the fp32 model and calibration text")
            say(f"calibrating {scheme.value} on {calib_samples} samples")
            data = calibration_data(fp32_path, calib_ids, samples=calib_samples, threads=threads)
            calibration = qt.calibrate(data)
            report.calibration = {
                "samples": {k: len(v) for k, v in data.items()},
                "tokens": int(len(calib_ids)),
            }
        say(f"quantizing: {scheme.value}")
        result = qt.quantize(calibration, enable_progress_report=False)
    out = bytes(result.quantized_model)
    report.size_fp32_bytes = len(fp32)
    report.size_bytes = len(out)
    return out, report
