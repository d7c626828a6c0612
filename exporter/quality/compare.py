"""One comparison of a candidate decoder with a reference: the parity gate of every flow.

The ONNX export (``parity.check_parity``), the static-shape export
(``profile_export.static_parity``) and the TFLite export (``tflite_export.check_tflite_parity``)
differ only in how they build their decoders and choose their tokens. All three then run the
same thing, :func:`compare_decoders`: a prefill and one-token decode steps through both
decoders (the runtime's ``reset`` / ``step(ids, all_logits)`` protocol, so the gate tests
what users run), the largest absolute logit difference against one tolerance rule
(:class:`Tolerance`), and argmax agreement at every position. The result,
:class:`ParityResult`, is the manifest's ``verification.parity`` section.

The reference may be a decoder or logits recorded earlier (``step_logits``): the ONNX flow
records PyTorch's and releases the model before ONNX Runtime loads the graph, so the two
never share memory. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from slmedge.runtimes.generation import Decoder

#: fp16 keeps ~3 significant digits; its logits are compared relative to their scale.
FP16_RTOL_OF_SCALE = 2e-2


@dataclass(frozen=True)
class Tolerance:
    """How far the candidate's logits may be from the reference's.

    ``allowed = max(atol + rtol * scale, scale_floor * scale, quant_steps * step)`` where
    ``scale`` is the reference logits' largest magnitude and ``step`` one quantization step of
    their range at ``quant_bits`` (``range / (2^bits - 1)``, as ExecuTorch's tester). Each term
    is 0 unless set: an fp32 graph takes ``atol`` (+ ``rtol``, the architecture's relative
    part); fp16 adds a floor of 2% of the scale; a quantized graph an allowance in steps.
    ``require_argmax``: a position whose top-1 token differs fails the comparison even within
    the tolerance (the flows record agreement without gating on it)."""

    atol: float
    rtol: float = 0.0
    scale_floor: float = 0.0
    quant_bits: int | None = None
    quant_steps: float = 0.0
    require_argmax: bool = False

    def __post_init__(self):
        if self.atol < 0 or self.rtol < 0 or self.scale_floor < 0 or self.quant_steps < 0:
            raise ValueError(f"tolerance terms must be >= 0, got {self}")
        if self.quant_steps and not self.quant_bits:
            raise ValueError(f"quant_steps={self.quant_steps:g} needs quant_bits (the weights' "
                             "bits, which set the size of one step)")

    @classmethod
    def for_dtype(cls, atol: float, rtol: float = 0.0, *, fp16: bool = False) -> Tolerance:
        """The ONNX and static-shape gates: ``atol + rtol x scale``, at least 2% of the scale
        for fp16."""
        return cls(atol=atol, rtol=rtol, scale_floor=FP16_RTOL_OF_SCALE if fp16 else 0.0)

    def allowed(self, scale: float, span: float) -> tuple[float, str]:
        """The allowed max |diff| for logits of largest magnitude ``scale`` and range ``span``,
        and which term set it."""
        terms = [(self.atol + self.rtol * scale,
                  f"atol {self.atol:g} + {self.rtol:g} x logit scale {scale:.3g}" if self.rtol
                  else f"atol {self.atol:g}")]
        if self.scale_floor:
            terms.append((self.scale_floor * scale,
                          f"{self.scale_floor:g} x logit scale {scale:.3g}"))
        if self.quant_steps:
            terms.append((self.quant_steps * (span / (2**self.quant_bits - 1)),
                          f"{self.quant_steps:g} steps of (logit range / (2^{self.quant_bits} - 1))"))
        # the first of equal terms wins: atol names the tolerance when nothing else raises it
        return max(terms, key=lambda t: t[0])


@dataclass
class ParityResult:
    """A candidate against a reference on one prefill and ``decode_steps`` steps;
    ``to_dict()`` is the manifest's ``verification.parity``."""

    max_abs_diff: float
    logit_scale: float  # max |reference logit|
    logit_range: float  # max - min of the reference logits
    atol: float  # the allowed max |diff| (every term of the tolerance applied)
    tolerance: str  # which term of the tolerance set atol
    prefill_tokens: int
    decode_steps: int
    argmax_agree: bool  # top-1 token equal at every position
    argmax_agreement: float  # fraction of positions whose top-1 token is equal
    passed: bool

    def to_dict(self) -> dict:
        return asdict(self)


def step_logits(decoder: Decoder, prompt: Sequence[int], steps: Sequence[int]) -> list[np.ndarray]:
    """Logits ``[len(prompt), vocab]`` of a prefill and then ``[1, vocab]`` of each decode
    token, as float32; the decoder is reset before and after."""
    decoder.reset()
    try:
        out = [np.asarray(decoder.step(list(prompt), all_logits=True), dtype=np.float32)]
        out += [np.asarray(decoder.step([int(t)], all_logits=True), dtype=np.float32)
                for t in steps]
    finally:
        decoder.reset()
    return out


def compare_logits(got: Sequence[np.ndarray], ref: Sequence[np.ndarray],
                   tolerance: Tolerance) -> ParityResult:
    """Compare per-step logits (the prefill first, then one row per decode step)."""
    if len(got) != len(ref) or any(np.shape(a) != np.shape(b) for a, b in zip(got, ref)):
        raise ValueError(
            f"candidate and reference logits differ in shape: "
            f"{[np.shape(a) for a in got]} vs {[np.shape(b) for b in ref]}; both must come "
            "from the same prompt and decode tokens")
    diff = max(float(np.abs(np.asarray(a, np.float32) - b).max()) for a, b in zip(got, ref))
    scale = max(float(np.abs(r).max()) for r in ref)
    span = float(max(r.max() for r in ref) - min(r.min() for r in ref))
    allowed, how = tolerance.allowed(scale, span)
    hits = np.concatenate([np.asarray(a).argmax(-1) == np.asarray(b).argmax(-1)
                           for a, b in zip(got, ref)])
    agree = bool(hits.all())
    return ParityResult(
        max_abs_diff=diff,
        logit_scale=scale,
        logit_range=span,
        atol=allowed,
        tolerance=how,
        prefill_tokens=int(np.shape(ref[0])[0]),
        decode_steps=len(ref) - 1,
        argmax_agree=agree,
        argmax_agreement=float(hits.mean()),
        passed=diff <= allowed and (agree or not tolerance.require_argmax),
    )


def compare_decoders(candidate: Decoder, reference: Decoder | Sequence[np.ndarray],
                     prompt: Sequence[int], steps: Sequence[int],
                     tolerance: Tolerance) -> ParityResult:
    """Run ``prompt`` (one prefill) and then each of ``steps`` (one decode step each) through
    ``candidate`` and compare with ``reference``: a decoder run the same way, or its logits
    recorded by :func:`step_logits` (or any per-step split of a whole-sequence forward)."""
    ref = (step_logits(reference, prompt, steps) if hasattr(reference, "step")
           else [np.asarray(r, dtype=np.float32) for r in reference])
    if len(ref) != 1 + len(steps) or len(ref[0]) != len(prompt):
        raise ValueError(
            f"the recorded reference has {len(ref)} step(s), the first of {len(ref[0])} "
            f"position(s); the comparison runs a {len(prompt)}-token prefill and "
            f"{len(steps)} decode step(s): record it with step_logits on the same tokens")
    return compare_logits(step_logits(candidate, prompt, steps), ref, tolerance)
