"""The quality card on fake decoders whose logits are known exactly."""

import math

import numpy as np
import pytest

from slmedge.exporter.quality.card import kl_rows, quality_card

VOCAB = 16


class TableDecoder:
    """Logits are a fixed function of (position, token): next token = (token + 1) % VOCAB,
    unless ``flip_at`` says otherwise; ``noise`` perturbs every row."""

    def __init__(self, flip_at=(), noise=0.0, seed=0):
        self.flip_at = set(flip_at)
        self.noise = noise
        self.rng = np.random.default_rng(seed)
        self.pos = 0

    def reset(self):
        self.pos = 0

    def _row(self, token):
        row = np.zeros(VOCAB, np.float32)
        nxt = (token + 1) % VOCAB
        if self.pos in self.flip_at:
            nxt = (token + 2) % VOCAB
        row[nxt] = 5.0
        if self.noise:
            row += self.rng.normal(0, self.noise, VOCAB).astype(np.float32)
        self.pos += 1
        return row

    def step(self, token_ids, all_logits=False):
        rows = np.stack([self._row(t) for t in token_ids])
        return rows if all_logits else rows[-1]


def test_identical_decoders_give_a_perfect_card():
    ids = [i % VOCAB for i in range(300)]
    card = quality_card(TableDecoder(), ids, reference=TableDecoder(), prompt_ids=[[1, 2, 3]],
                        window=64, stride=32, new_tokens=10)
    assert card.perplexity == pytest.approx(card.reference_perplexity)
    assert card.ppl_increase_pct == pytest.approx(0.0, abs=1e-9)
    assert card.kl_mean == pytest.approx(0.0, abs=1e-12)
    assert card.top1_agreement_eval == 1.0
    assert card.greedy["top1_agreement"] == 1.0
    assert card.greedy["first_divergence"] == [10]
    assert card.greedy["prompts_identical"] == 1


def test_first_divergence_is_the_first_missed_position():
    # Prompt of 3 tokens: positions 0-2; the first generated token is predicted at position 2,
    # the k-th generated token at position 2 + k. Flip position 2 + 4 -> divergence at 4.
    cand = TableDecoder(flip_at={6})
    card = quality_card(cand, [i % VOCAB for i in range(40)], reference=TableDecoder(), prompt_ids=[[1, 2, 3]],
                        window=16, stride=8, new_tokens=8)
    assert card.greedy["first_divergence"] == [4]
    assert card.greedy["top1_agreement"] == pytest.approx(7 / 8)
    assert card.greedy["kl_mean"] > 0


def test_noisy_candidate_has_positive_kl_and_worse_perplexity():
    ids = [i % VOCAB for i in range(200)]
    card = quality_card(TableDecoder(noise=1.0), ids, reference=TableDecoder(), window=64, stride=32)
    assert card.kl_mean > 0.01
    assert card.ppl_increase_pct > 0
    assert card.greedy is None  # no prompts given


def test_without_reference_only_perplexity():
    ids = [i % VOCAB for i in range(100)]
    card = quality_card(TableDecoder(), ids, window=64, stride=32)
    # p(correct) = e^5 / (e^5 + 15)
    want = math.exp(-math.log(math.exp(5) / (math.exp(5) + VOCAB - 1)))
    assert card.perplexity == pytest.approx(want, rel=1e-6)
    assert card.reference_perplexity is None and card.kl_mean is None
    assert "kl_mean" not in card.to_dict()


def test_kl_rows_matches_the_definition():
    rng = np.random.default_rng(0)
    p, q = rng.normal(size=(3, 7)), rng.normal(size=(3, 7))
    sp = np.exp(p) / np.exp(p).sum(1, keepdims=True)
    sq = np.exp(q) / np.exp(q).sum(1, keepdims=True)
    np.testing.assert_allclose(kl_rows(p, q, chunk=2), (sp * np.log(sp / sq)).sum(1), rtol=1e-10)
