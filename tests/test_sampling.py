"""generate/sampling.py: the argument checks, greedy picks, what filter_logits keeps, and draws
reproducible from a generator, frequencies against softmax(logits / T), top-k and top-p counts."""

import math

import pytest
import torch

from blockrecurrent.generate.sampling import (
    check_count,
    check_sampling,
    filter_logits,
    sample_next,
)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(temperature=-1.0), ValueError, "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature=True), TypeError, "temperature must be a number"),
    (dict(top_k=0), ValueError, "top_k must be >= 1"),
    (dict(top_k=2.0), TypeError, "top_k must be an int or None"),
    (dict(top_p=0.0), ValueError, r"top_p must lie in \(0, 1\]"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(top_p="0.9"), TypeError, "top_p must be a number or None"),
    (dict(do_sample=1), TypeError, "do_sample must be a bool"),
])
def test_bad_sampling_settings(kwargs, error, match):
    settings = dict(temperature=1.0, top_k=None, top_p=None, do_sample=True) | kwargs
    with pytest.raises(error, match=match):
        check_sampling(**settings)


def test_check_count():
    check_count("max_new_tokens", 3, 1)
    with pytest.raises(TypeError, match="max_new_tokens must be an int, got bool"):
        check_count("max_new_tokens", True, 1)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        check_count("max_new_tokens", 0, 1)


def test_greedy_is_the_argmax():
    logits = torch.randn(4, 9)
    want = logits.argmax(-1)
    assert torch.equal(sample_next(logits, do_sample=False), want)
    assert torch.equal(sample_next(logits, temperature=0), want)  # temperature 0 means greedy
    assert torch.equal(sample_next(logits, top_k=1, generator=torch.Generator().manual_seed(0)),
                       want)


def test_filter_logits_keeps_the_most_likely_token_in_float32():
    logits = torch.randn(3, 50, dtype=torch.float64)
    out = filter_logits(logits, top_k=5, top_p=1e-6)
    assert out.dtype == torch.float32
    assert (out.isfinite().sum(-1) == 1).all() and torch.equal(out.argmax(-1), logits.argmax(-1))
    assert torch.equal(filter_logits(logits, top_k=50), logits.float())  # k = vocabulary: all
    with pytest.raises(ValueError, match="greedy"):
        filter_logits(logits, temperature=0)


def test_draws_are_reproducible_and_among_the_kept_tokens():
    logits = torch.randn(5, 20)

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return sample_next(logits, temperature=1.3, top_p=0.9, generator=g)

    assert torch.equal(draw(3), draw(3))
    kept = filter_logits(logits, 1.3, top_p=0.9).isfinite()
    for seed in range(20):
        assert kept[torch.arange(5), draw(seed)].all()


def test_filter_logits_temperature_top_k_top_p():
    logits = torch.tensor([[0.3, 1.2, -0.5, 2.0, 0.0]])
    for t in (0.5, 1.0, 3.0):
        torch.testing.assert_close(filter_logits(logits, t).softmax(-1), (logits / t).softmax(-1))
    kept = filter_logits(logits, top_k=2).isfinite()
    assert kept.tolist() == [[False, True, False, True, False]]
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    for top_p, n_kept in ((0.45, 1), (0.7, 2), (0.9, 3), (1.0, 4)):
        out = filter_logits(probs.log(), top_p=top_p)
        assert int(out.isfinite().sum()) == n_kept
        assert out.isfinite()[0, 1]  # the most likely token always stays
    # Frequencies follow softmax(logits / T): p(1) = 3/4 at T=1, sqrt(3)/(1+sqrt(3)) at T=2.
    two = torch.tensor([[0.0, math.log(3)]]).expand(20000, 2)
    g = torch.Generator().manual_seed(0)
    for t, want in ((1.0, 0.75), (2.0, 3 ** 0.5 / (1 + 3 ** 0.5))):
        freq = sample_next(two, temperature=t, generator=g).float().mean().item()
        assert abs(freq - want) < 0.015
