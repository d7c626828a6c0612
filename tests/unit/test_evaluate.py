"""Perplexity windows: every token after the first is scored exactly once."""

import math

import numpy as np
import pytest

from slmedge.runtimes.evaluate import perplexity, plan_windows, token_nll


@pytest.mark.parametrize("n", [2, 5, 511, 512, 513, 700, 768, 769, 1000, 4096])
def test_windows_score_each_target_once(n):
    plans = plan_windows(n, 512, 256)
    scored = [t for w in plans for t in range(w.score_from, w.end)]
    assert scored == list(range(1, n))
    assert plans[0].begin == 0 and plans[0].score_from == 1  # first window scores all
    for w in plans[1:]:
        assert w.end - w.score_from <= 256  # later windows: only their last stride
        assert w.end - w.begin <= 512
        assert w.score_from - w.begin >= 256  # with at least window - stride of context


def test_first_window_and_stride_match_the_spec_for_4096_tokens():
    plans = plan_windows(4096, 512, 256)
    assert (plans[0].begin, plans[0].end, plans[0].score_from) == (0, 512, 1)
    assert (plans[1].begin, plans[1].end, plans[1].score_from) == (256, 768, 512)
    assert plans[-1].end == 4096 and len(plans) == 15


def test_token_nll_is_cross_entropy():
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    nll = token_nll(logits, np.array([0, 2]))
    expected0 = -(2.0 - math.log(math.exp(2) + 1 + math.exp(-1)))
    np.testing.assert_allclose(nll, [expected0, math.log(3)], rtol=1e-12)


def test_uniform_model_has_perplexity_equal_to_vocab_size():
    vocab = 41
    result = perplexity(lambda ids: np.zeros((len(ids), vocab), np.float32), list(range(40)) * 30,
                        window=64, stride=32)
    assert result.perplexity == pytest.approx(vocab, rel=1e-9)
    assert result.scored == 40 * 30 - 1


def test_bad_window_settings_fail():
    with pytest.raises(ValueError):
        plan_windows(100, 512, 0)
    with pytest.raises(ValueError):
        plan_windows(100, 256, 512)
