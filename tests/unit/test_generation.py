"""The generation loop and sampler, on a fake decoder with known logits (no model needed)."""

import numpy as np
import pytest

from slmedge.runtimes.generation import Sampler, SamplingConfig, generate


class ScriptedDecoder:
    """Returns logits that make token ``(last + 1) % vocab`` the argmax; records the calls."""

    def __init__(self, vocab=10):
        self.vocab = vocab
        self.calls = []

    def reset(self):
        self.calls.append("reset")

    def step(self, ids, all_logits=False):
        self.calls.append(list(ids))
        logits = np.zeros(self.vocab, dtype=np.float32)
        logits[(ids[-1] + 1) % self.vocab] = 5.0
        return logits


def test_greedy_follows_the_argmax_and_feeds_one_token_per_step():
    dec = ScriptedDecoder()
    result = generate(dec, [3, 4], 5)
    assert result.tokens == [5, 6, 7, 8, 9]
    assert dec.calls == ["reset", [3, 4], [5], [6], [7], [8]]
    assert result.stop_reason == "length"
    assert len(result.step_s) == 4 and result.ttft_s > 0


def test_stops_at_a_stop_token_without_emitting_it():
    result = generate(ScriptedDecoder(), [3], 10, stop_ids={6})
    assert result.tokens == [4, 5]
    assert result.stop_reason == "eos"


def test_rejects_empty_prompt_and_zero_budget():
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(ScriptedDecoder(), [], 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(ScriptedDecoder(), [1], 0)


def test_sampling_is_reproducible_with_a_seed_and_varies_without_one():
    logits = np.log(np.array([0.1, 0.2, 0.3, 0.4]))
    a = [Sampler(SamplingConfig(temperature=1.0, seed=7))(logits) for _ in range(1)]
    s1, s2 = Sampler(SamplingConfig(temperature=1.0, seed=7)), Sampler(SamplingConfig(1.0, seed=7))
    draws1 = [s1(logits) for _ in range(50)]
    draws2 = [s2(logits) for _ in range(50)]
    assert draws1 == draws2 and a[0] == draws1[0]
    assert len(set(draws1)) > 1


def test_sampling_frequencies_follow_the_distribution():
    probs = np.array([0.1, 0.2, 0.3, 0.4])
    sampler = Sampler(SamplingConfig(temperature=1.0, seed=0))
    counts = np.bincount([sampler(np.log(probs)) for _ in range(4000)], minlength=4) / 4000
    np.testing.assert_allclose(counts, probs, atol=0.03)


def test_top_k_and_top_p_restrict_the_candidates():
    logits = np.log(np.array([0.05, 0.15, 0.3, 0.5]))
    top2 = Sampler(SamplingConfig(temperature=1.0, top_k=2, seed=0))
    assert {top2(logits) for _ in range(300)} == {2, 3}
    # 0.5 alone < 0.7; 0.5 + 0.3 reaches it: only ids 3 and 2 remain.
    nucleus = Sampler(SamplingConfig(temperature=1.0, top_p=0.7, seed=0))
    assert {nucleus(logits) for _ in range(300)} == {2, 3}
    tiny_p = Sampler(SamplingConfig(temperature=1.0, top_p=0.01, seed=0))
    assert {tiny_p(logits) for _ in range(50)} == {3}


def test_low_temperature_approaches_greedy_and_bad_configs_fail():
    logits = np.array([1.0, 2.0, 1.5])
    cold = Sampler(SamplingConfig(temperature=0.01, seed=0))
    assert {cold(logits) for _ in range(100)} == {1}
    for bad in (dict(temperature=-1), dict(top_k=-1), dict(top_p=0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)
