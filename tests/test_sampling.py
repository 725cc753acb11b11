"""The on-device sampler against a numpy reference of the filtered distribution, and
SamplingParams validation."""
import numpy as np
import pytest

from jaxserve.sampling import SAMPLER_MODES, SamplingParams, sample, sampler_mode


def reference_probs(logits, temperature, top_k, top_p):
    """float64 numpy: temperature, then top-k, then top-p (smallest prefix with mass >= top_p)."""
    z = logits.astype(np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    keep = np.zeros_like(z, bool)
    p = np.exp(z[order] - z[order].max())
    k = len(z) if top_k < 0 else top_k
    p[k:] = 0
    p /= p.sum()
    mass_before = np.cumsum(p) - p
    keep[order] = (mass_before < top_p) & (np.arange(len(z)) < k)
    out = np.where(keep, np.exp(z - z.max()), 0)
    return out / out.sum()


def draw(logits, temperature, top_k, top_p, n, seed0=0, mode="filtered"):
    rows = np.repeat(logits[None], n, 0).astype(np.float32)
    seeds = np.stack([np.arange(seed0, seed0 + n), np.zeros(n)], 1).astype(np.uint32)
    tokens, lp, _, _ = sample(rows, np.full(n, temperature, np.float32), np.full(n, top_k, np.int32),
                              np.full(n, top_p, np.float32), seeds, np.zeros(n, np.int32), mode=mode)
    return np.asarray(tokens), np.asarray(lp)


@pytest.mark.parametrize("temperature,top_k,top_p,mode", [
    (1.0, -1, 1.0, "random"), (0.5, -1, 1.0, "random"), (1.0, -1, 1.0, "filtered"), (0.7, 3, 1.0, "filtered"),
    (1.3, -1, 0.6, "filtered"), (1.0, 4, 0.8, "filtered")])
def test_sample_frequencies_match_reference(temperature, top_k, top_p, mode):
    logits = np.random.default_rng(1).normal(size=10) * 1.5
    n = 6000
    tokens, _ = draw(logits, temperature, top_k, top_p, n, mode=mode)
    freq = np.bincount(tokens, minlength=10) / n
    want = reference_probs(logits, temperature, top_k, top_p)
    assert np.all(freq[want == 0] == 0), "sampled a token the filters remove"
    # 4.5 binomial standard deviations per token: a false alarm is ~1e-5 per token.
    assert np.all(np.abs(freq - want) <= 4.5 * np.sqrt(want * (1 - want) / n) + 1e-9)


def test_greedy_and_logprobs():
    logits = np.random.default_rng(2).normal(size=(3, 50)).astype(np.float32)
    tokens, lp, top_ids, top_lp = sample(logits, np.zeros(3, np.float32), np.full(3, -1, np.int32),
                                         np.ones(3, np.float32), np.zeros((3, 2), np.uint32),
                                         np.zeros(3, np.int32), num_logprobs=5)
    ref = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    np.testing.assert_array_equal(tokens, logits.argmax(-1))
    np.testing.assert_allclose(lp, ref.max(-1), atol=1e-5)
    np.testing.assert_array_equal(top_ids, np.argsort(-ref, -1)[:, :5])
    np.testing.assert_allclose(top_lp, -np.sort(-ref, -1)[:, :5], atol=1e-5)


def test_same_seed_same_tokens_different_seed_different():
    logits = np.zeros(1000)
    a, _ = draw(logits, 1.0, -1, 1.0, 64, seed0=5)
    b, _ = draw(logits, 1.0, -1, 1.0, 64, seed0=5)
    c, _ = draw(logits, 1.0, -1, 1.0, 64, seed0=500)
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.9



def test_every_mode_that_serves_a_row_gives_it_the_same_token():
    """A seeded row's token must not depend on its neighbours: the batch's mode (chosen from all
    rows) only skips work. Rows: greedy, sampling without filters, sampling with filters."""
    rng = np.random.default_rng(3)
    n, vocab = 96, 300
    logits = rng.normal(size=(n, vocab)).astype(np.float32) * 2
    temperature = np.where(np.arange(n) % 3 == 0, 0.0, rng.uniform(0.5, 1.5, n)).astype(np.float32)
    filtered = np.arange(n) % 3 == 2
    top_k = np.where(filtered, rng.integers(1, 40, n), -1).astype(np.int32)
    top_p = np.where(filtered, rng.uniform(0.3, 1.0, n), 1.0).astype(np.float32)
    seeds = rng.integers(0, 2**32, (n, 2), dtype=np.uint32)
    steps = rng.integers(0, 100, n).astype(np.int32)
    assert sampler_mode(temperature, top_k, top_p) == "filtered"
    out = {mode: sample(logits, temperature, top_k, top_p, seeds, steps, num_logprobs=2, mode=mode)
           for mode in SAMPLER_MODES}
    greedy_rows, plain_rows = temperature == 0, (temperature > 0) & ~filtered
    for mode in SAMPLER_MODES:
        for a, b in zip(out[mode], out["filtered"]):
            rows = greedy_rows if mode == "greedy" else greedy_rows | plain_rows
            np.testing.assert_array_equal(np.asarray(a)[rows], np.asarray(b)[rows])
    np.testing.assert_array_equal(np.asarray(out["greedy"][0]), logits.argmax(-1))
    assert (np.asarray(out["random"][0])[plain_rows] != logits.argmax(-1)[plain_rows]).any()


def test_sampler_mode_is_the_cheapest_that_serves_every_row():
    t, k, p = np.zeros(4), np.full(4, -1), np.ones(4)
    assert sampler_mode(t, k, p) == "greedy"
    assert sampler_mode(t, np.array([5, -1, -1, -1]), p) == "greedy"  # top-k of a greedy row: nothing to draw
    t[1] = 0.8
    assert sampler_mode(t, k, p) == "random"
    assert sampler_mode(t, k, np.array([1, 1, 1, 0.9])) == "random"  # top-p of a greedy row only
    assert sampler_mode(t, k, np.array([1, 0.9, 1, 1])) == "filtered"
    assert sampler_mode(t, np.array([-1, 3, -1, -1]), p) == "filtered"
    with pytest.raises(ValueError, match="mode='beam' is invalid; allowed: greedy, random, filtered"):
        sample(np.zeros((1, 4), np.float32), t[:1], k[:1], p[:1], np.zeros((1, 2), np.uint32),
               np.zeros(1, np.int32), mode="beam")

@pytest.mark.parametrize("field,value", [("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5),
                                         ("top_k", -2), ("max_tokens", 0), ("seed", -1),
                                         ("logprobs", 21), ("stop", [""]), ("stop_token_ids", [-1]),
                                         ("stop", 5), ("stop_token_ids", 5), ("temperature", "0.5"),
                                         ("n", 2)])
def test_invalid_sampling_params_name_value_and_range(field, value):
    with pytest.raises(ValueError) as err:
        SamplingParams(**{field: value})
    assert field in str(err.value) and repr(value) in str(err.value) and "allowed" in str(err.value)


def test_numpy_numbers_are_numbers():
    p = SamplingParams(temperature=np.float32(0.5), top_p=np.float64(0.9), top_k=np.int64(3), seed=np.uint32(7),
                       max_tokens=np.int32(4), logprobs=np.int8(2))
    assert (p.temperature, p.top_p, p.top_k, p.seed, p.max_tokens, p.logprobs) == (0.5, 0.9, 3, 7, 4, 2)
    assert all(type(v) in (int, float) for v in (p.temperature, p.top_p, p.top_k, p.seed, p.max_tokens))
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=np.float32(3.0))


def test_sampling_params_normalises():
    p = SamplingParams(stop="###", top_k=0)
    assert p.stop == ["###"] and p.top_k == -1 and p.stop_token_ids == []
