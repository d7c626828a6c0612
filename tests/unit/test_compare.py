"""exporter/quality/compare.py: the one parity comparison, on synthetic decoders (no model, no graph)."""

import numpy as np
import pytest

from slmedge.exporter.quality.compare import (
    FP16_RTOL_OF_SCALE,
    Tolerance,
    compare_decoders,
    compare_logits,
    step_logits,
)

VOCAB = 16


class TableDecoder:
    """Logits of a fixed table row per absolute position, plus ``offset`` at ``where``
    (position, vocab index): a decoder whose error is known exactly."""

    def __init__(self, table: np.ndarray, offset: float = 0.0, where=(0, 0)):
        self.table, self.offset, self.where = table, offset, where
        self.pos = 0
        self.resets = 0

    def reset(self) -> None:
        self.pos = 0
        self.resets += 1

    def step(self, token_ids, all_logits: bool = False) -> np.ndarray:
        rows = self.table[self.pos : self.pos + len(token_ids)].copy()
        p, v = self.where
        if self.pos <= p < self.pos + len(token_ids):
            rows[p - self.pos, v] += self.offset
        self.pos += len(token_ids)
        return rows if all_logits else rows[-1]


@pytest.fixture
def table():
    # row i: a clear top-1 at i % VOCAB (10.0 against values in [-4, 4]), scale exactly 10
    rng = np.random.default_rng(0)
    t = rng.uniform(-4, 4, (8, VOCAB)).astype(np.float32)
    t[np.arange(8), np.arange(8) % VOCAB] = 10.0
    t[0, 1] = -10.0  # range exactly 20
    return t


PROMPT, STEPS = [1, 2, 3, 4, 5], [6, 7]


def run(table, offset, tol, where=(6, 3)):
    return compare_decoders(TableDecoder(table, offset, where), TableDecoder(table),
                            PROMPT, STEPS, tol)


def test_atol_plus_rtol_times_scale_passes_just_inside_and_fails_just_outside(table):
    tol = Tolerance(atol=1e-3, rtol=1e-4)  # allowed 1e-3 + 1e-4 * 10 = 2e-3
    inside, outside = run(table, 1.9e-3, tol), run(table, 2.1e-3, tol)
    assert inside.atol == pytest.approx(2e-3) and inside.logit_scale == 10.0
    assert inside.passed and inside.max_abs_diff == pytest.approx(1.9e-3, rel=1e-3)
    assert not outside.passed and outside.max_abs_diff == pytest.approx(2.1e-3, rel=1e-3)
    assert inside.prefill_tokens == 5 and inside.decode_steps == 2
    assert inside.tolerance == "atol 0.001 + 0.0001 x logit scale 10"


def test_an_error_in_a_decode_step_counts_as_in_the_prefill(table):
    tol = Tolerance(atol=1e-3)
    assert not run(table, 2e-3, tol, where=(1, 5)).passed  # prefill row
    assert not run(table, 2e-3, tol, where=(6, 5)).passed  # last decode step
    assert run(table, 0.0, tol).max_abs_diff == 0.0


def test_fp16_floor_is_two_percent_of_the_scale(table):
    tol = Tolerance.for_dtype(1e-4, fp16=True)
    assert tol.allowed(10.0, 20.0)[0] == pytest.approx(FP16_RTOL_OF_SCALE * 10.0)
    assert run(table, 0.19, tol).passed and not run(table, 0.21, tol).passed
    fp32 = Tolerance.for_dtype(1e-4)
    assert not run(table, 0.19, fp32).passed and fp32.allowed(10.0, 20.0) == (1e-4, "atol 0.0001")


def test_quantization_steps_of_the_logit_range(table):
    tol = Tolerance(atol=1e-4, quant_bits=8, quant_steps=4.0)  # 4 x 20 / 255 = 0.3137
    step = 4.0 * (20.0 / 255)
    inside, outside = run(table, step - 1e-3, tol), run(table, step + 1e-3, tol)
    assert inside.logit_range == 20.0 and inside.atol == pytest.approx(step)
    assert inside.passed and not outside.passed
    assert inside.tolerance == "4 steps of (logit range / (2^8 - 1))"
    # a wide atol still wins over a small allowance, and is named
    assert Tolerance(atol=1.0, quant_bits=8, quant_steps=4.0).allowed(10.0, 20.0) == (1.0, "atol 1")
    with pytest.raises(ValueError, match="needs quant_bits"):
        Tolerance(atol=1e-4, quant_steps=4.0)


def test_argmax_disagreement_is_recorded_and_fails_when_required(table):
    # +14.5 on a non-top token (in [-4, 4]) of the last decode row: above its top 10.0, so the
    # top-1 changes at 1 of 7 positions, within a wide atol
    where = (6, 0)
    loose = Tolerance(atol=15.0)
    strict = Tolerance(atol=15.0, require_argmax=True)
    rec, req = run(table, 14.5, loose, where), run(table, 14.5, strict, where)
    assert rec.passed and not rec.argmax_agree
    assert rec.argmax_agreement == pytest.approx(6 / 7)
    assert not req.passed and req.max_abs_diff <= req.atol
    same = run(table, 1e-3, strict)
    assert same.passed and same.argmax_agree and same.argmax_agreement == 1.0


def test_recorded_reference_equals_a_live_one_and_decoders_are_reset(table):
    ref = step_logits(TableDecoder(table), PROMPT, STEPS)
    assert [r.shape for r in ref] == [(5, VOCAB), (1, VOCAB), (1, VOCAB)]
    cand = TableDecoder(table, 5e-4)
    recorded = compare_decoders(cand, ref, PROMPT, STEPS, Tolerance(atol=1e-3))
    live = run(table, 5e-4, Tolerance(atol=1e-3), where=(0, 0))
    assert recorded.to_dict() == live.to_dict()
    assert cand.pos == 0 and cand.resets == 2  # reset before and after


def test_a_reference_of_other_tokens_is_refused(table):
    ref = step_logits(TableDecoder(table), PROMPT, STEPS)
    with pytest.raises(ValueError, match="record it with step_logits on the same tokens"):
        compare_decoders(TableDecoder(table), ref, PROMPT[:4], STEPS, Tolerance(atol=1e-3))
    with pytest.raises(ValueError, match="differ in shape"):
        compare_logits(ref[:2], ref, Tolerance(atol=1e-3))


def test_static_card_is_the_quality_card_on_one_window(table):
    """static_quality (the static-shape flows' card) is quality_card on one window: the ONNX
    card's QualityCard (the same manifest keys), perplexity by hand, greedy first divergence."""
    from slmedge.exporter.quality.card import QualityCard
    from slmedge.exporter.onnx.static_shapes_qdq import static_quality

    big = np.random.default_rng(1).uniform(-3, 3, (32, VOCAB)).astype(np.float32)
    big[np.arange(32), np.arange(32) % VOCAB] += 6.0  # clear top-1 everywhere
    ref, cand = TableDecoder(big), TableDecoder(big, 20.0, (6, 0))  # top-1 flips at position 6
    ref.context = cand.context = 24
    ids = [int(i) for i in np.random.default_rng(2).integers(0, VOCAB, 30)]
    card = static_quality(ref, cand, ids, prompts=2, prompt_tokens=4, new_tokens=4, window=16)
    logp = big[:15].astype(np.float64)
    logp = logp - logp.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    want = float(np.exp(-logp[np.arange(15), ids[1:16]].mean()))
    assert isinstance(card, QualityCard)
    assert card.eval == {"tokens": 16, "window": 16, "stride": 16, "windows": 1}
    assert card.reference_perplexity == pytest.approx(want, rel=1e-9) and card.kl_mean > 0
    assert card.cosine_min < card.cosine_mean < 1.0
    # a table decoder reads rows by position: each prompt fills positions 0-3 and its greedy
    # tokens are read at rows 3, 4, 5, 6; the flip at row 6 is the 4th (index 3) of each
    assert card.greedy["first_divergence"] == [3, 3] and card.greedy["top1_agreement"] == 0.75
    assert card.greedy["prompts"] == 2 and card.greedy["new_tokens"] == 4
    assert card.greedy["prompt_tokens"] == 4
    doc = card.to_dict()  # the manifest's keys: the ONNX card's, none renamed
    assert {"tokens", "greedy_agreement", "first_divergence"}.isdisjoint(doc)
    assert {"perplexity", "reference_perplexity", "ppl_increase_pct", "kl_mean", "cosine_mean",
            "top1_agreement_eval", "greedy", "eval"} <= set(doc)
    same = static_quality(ref, TableDecoder(big), ids, prompts=2, prompt_tokens=4,
                          new_tokens=4, window=16)
    assert same.cosine_min == pytest.approx(1.0) and same.kl_mean == 0.0
    assert same.ppl_increase_pct == 0.0 and same.greedy["first_divergence"] == [4, 4]
