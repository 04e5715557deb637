"""Paired statistics for the release gate, against values worked out by hand."""

from __future__ import annotations

import math
import random

import pytest

from evals import stats


@pytest.mark.parametrize("b, c, expected", [
    (10, 0, 2 / 2 ** 10),
    (0, 10, 2 / 2 ** 10),
    (5, 5, 1.0),
    (0, 0, 1.0),
    (15, 5, 2 * (1 + 20 + 190 + 1140 + 4845 + 15504) / 2 ** 20),
])
def test_exact_mcnemar_matches_the_binomial_tail(b, c, expected):
    assert stats.mcnemar_exact(b, c) == pytest.approx(expected)


def test_sign_flips_are_enumerated_exactly_for_small_samples():
    assert stats.sign_flip_test([1.0] * 6) == pytest.approx(1 / 64)
    assert stats.sign_flip_test([1.0] * 6, alternative="less") == pytest.approx(1.0)
    assert stats.sign_flip_test([1.0] * 6, alternative="two-sided") == pytest.approx(2 / 64)
    assert stats.sign_flip_test([3.0, -1.0]) == pytest.approx(2 / 4)  # (+3,+1) and (+3,-1)


def test_monte_carlo_sign_flips_separate_a_real_shift_from_noise():
    rng = random.Random(1)
    shifted = [rng.gauss(0.5, 1.0) for _ in range(60)]
    noise = [rng.gauss(0.0, 1.0) for _ in range(60)]
    assert stats.sign_flip_test(shifted) < 0.01
    assert stats.sign_flip_test(noise, alternative="two-sided") > 0.05
    assert stats.sign_flip_test(shifted, seed=1) == stats.sign_flip_test(shifted, seed=1)


def test_paired_summary_gives_the_mean_sd_and_effect_size():
    s = stats.paired_summary([1.0, 2.0, 3.0])
    assert (s.n, s.mean, s.sd, s.dz) == (3, 2.0, 1.0, 2.0)
    assert stats.paired_summary([]).n == 0


def test_sample_size_follows_connor():
    z_a, z_b = 1.959964, 0.841621
    expected = math.ceil((z_a * math.sqrt(0.2) + z_b * math.sqrt(0.2 - 0.01)) ** 2 / 0.01)
    assert stats.mcnemar_sample_size(0.1, 0.2) == expected
    with pytest.raises(ValueError):
        stats.mcnemar_sample_size(0.3, 0.2)
