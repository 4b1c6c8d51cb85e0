"""Welford reward normalisation (SPEC Eq. 3 note)."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from knexa_cpm.rewards import EPS, RunningNorm


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=200))
def test_welford_matches_numpy(xs):
    norm = RunningNorm()
    for x in xs:
        norm.update(x)
    arr = np.array(xs)
    assert norm.count == len(xs)
    assert norm.mean == pytest.approx(arr.mean(), rel=1e-9, abs=1e-6)
    expect_std = arr.std() if len(xs) > 1 else 0.0
    assert norm.std == pytest.approx(expect_std, rel=1e-7, abs=1e-6)


def test_stable_with_large_offset():
    rng = np.random.default_rng(0)
    xs = 1e9 + rng.normal(size=10_000)
    norm = RunningNorm()
    for x in xs:
        norm.update(float(x))
    assert norm.std == pytest.approx(xs.std(), rel=1e-6)


def test_normalise_formula_and_first_reward():
    norm = RunningNorm()
    assert norm.push(5.0) == 0.0  # statistics include x: the first reward carries no signal
    norm.update(7.0)
    assert norm.normalise(8.0) == pytest.approx((8.0 - 6.0) / (1.0 + EPS))


def test_push_many_equals_push_in_order():
    rng = np.random.default_rng(1)
    xs = rng.normal(3.0, 2.0, 50)
    a, b = RunningNorm(), RunningNorm()
    seq = [a.push(float(x)) for x in xs]
    np.testing.assert_allclose(b.push_many(xs), seq, rtol=0, atol=0)
    assert a.state_dict() == b.state_dict()


def test_state_round_trip_and_validation():
    norm = RunningNorm()
    for x in (1.0, 2.0, 4.0):
        norm.update(x)
    clone = RunningNorm.from_state(norm.state_dict())
    assert (clone.count, clone.mean, clone.m2) == (norm.count, norm.mean, norm.m2)
    assert "count=3" in repr(clone)
    with pytest.raises(ValueError):
        RunningNorm(count=-1)
    with pytest.raises(ValueError):
        norm.update(math.nan)
    with pytest.raises(ValueError):
        norm.push_many(np.array([1.0, math.inf]))
    assert norm.count == 3  # rejected values leave the statistics alone
