"""Greedy disjoint matching: invariants, equality with the full-sort reference, ties, masks."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from knexa_cpm.matching import admissible_mask, default_k, greedy_disjoint, greedy_disjoint_naive


def check_invariants(pairs, n, k, scores=None):
    nodes = [v for p in pairs for v in p]
    assert len(nodes) == len(set(nodes)), "an agent appears twice"
    assert all(i != j for i, j in pairs), "self pair"
    assert all(0 <= v < n for v in nodes)
    assert len(pairs) <= k
    if scores is not None:
        assert all(np.isfinite(scores[i, j]) for i, j in pairs), "inadmissible pair chosen"


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 40), k=st.one_of(st.none(), st.integers(0, 25)),
       density=st.floats(0.05, 1.0), batch=st.sampled_from([None, 1, 3, 17]))
def test_equals_full_sort_reference(seed, n, k, density, batch):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(n, n))
    s[rng.random((n, n)) > density] = -np.inf
    fast = greedy_disjoint(s, k, np.random.default_rng(7), batch=batch)
    slow = greedy_disjoint_naive(s, k, np.random.default_rng(7))
    assert fast == slow
    check_invariants(fast, n, default_k(n, k), s)


def test_structured_scores_need_many_batches():
    # additive scores f_i + g_j concentrate the top entries on a few agents (like `concat`)
    rng = np.random.default_rng(0)
    n = 300
    s = rng.normal(size=n)[:, None] + rng.normal(size=n)[None, :] + 1e-3 * rng.normal(size=(n, n))
    fast = greedy_disjoint(s, None, np.random.default_rng(1))
    assert fast == greedy_disjoint_naive(s, None, np.random.default_rng(1))
    assert len(fast) == n // 2


def test_is_maximal_and_respects_k():
    rng = np.random.default_rng(1)
    s = rng.random((9, 9))
    pairs = greedy_disjoint(s, None, rng)
    assert len(pairs) == 4  # floor(9 / 2)
    assert len(greedy_disjoint(s, 2, rng)) == 2
    assert len(greedy_disjoint(s, 100, rng)) == 4
    assert greedy_disjoint(s, 0, rng) == []
    assert greedy_disjoint(np.zeros((1, 1)), None, rng) == []
    assert greedy_disjoint(np.zeros((0, 0)), None, rng) == []


def test_picks_in_descending_order_and_ignores_diagonal():
    s = np.array([[100.0, 1.0, 5.0], [2.0, 100.0, 3.0], [4.0, 6.0, 100.0]])
    assert greedy_disjoint(s, None, np.random.default_rng(0)) == [(2, 1)]


def test_mask_limits_what_can_be_paired():
    s = np.full((4, 4), -np.inf)
    s[0, 1] = 1.0  # only one admissible pair
    s[0, 2] = np.nan  # NaN is never admissible
    assert greedy_disjoint(s, None, np.random.default_rng(0)) == [(0, 1)]


def test_ties_are_random_but_reproducible():
    s = np.ones((2, 2))
    picks = {tuple(greedy_disjoint(s, None, np.random.default_rng(seed))[0]) for seed in range(40)}
    assert picks == {(0, 1), (1, 0)}  # both roles happen
    again = [greedy_disjoint(np.ones((6, 6)), None, np.random.default_rng(3)) for _ in range(2)]
    assert again[0] == again[1]


def test_admissible_mask_and_default_k():
    m = admissible_mask(3)
    assert m.sum() == 6 and not m.diagonal().any()
    custom = admissible_mask(3, np.ones((3, 3), dtype=bool))
    assert not custom.diagonal().any()
    with pytest.raises(ValueError):
        admissible_mask(3, np.ones((2, 2), dtype=bool))
    assert (default_k(7), default_k(7, 2), default_k(7, 9)) == (3, 2, 3)
    with pytest.raises(ValueError):
        default_k(4, -1)
    with pytest.raises(ValueError):
        greedy_disjoint(np.ones((2, 3)), None, np.random.default_rng(0))


def test_input_is_not_modified_unless_allowed():
    rng = np.random.default_rng(2)
    s = rng.random((5, 5))
    before = s.copy()
    greedy_disjoint(s, None, rng)
    np.testing.assert_array_equal(s, before)


def _best_by_brute_force(s: np.ndarray) -> float:
    """The largest total of disjoint ordered pairs (each taken in its better orientation, or not)."""
    best = 0.0

    def extend(free: list[int], value: float) -> None:
        nonlocal best
        best = max(best, value)
        if len(free) < 2:
            return
        head, rest = free[0], free[1:]
        extend(rest, value)
        for j in rest:
            extend([x for x in rest if x != j], value + max(s[head, j], s[j, head], 0.0))

    extend(list(range(s.shape[0])), 0.0)
    return best


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 9), st.integers(0, 2**32 - 1))
def test_whole_round_matchings_against_brute_force(n, seed):
    from knexa_cpm.matching import (
        matching_upper_bound,
        matching_value,
        max_weight_matching,
        round_matching,
    )

    s = np.random.default_rng(seed).normal(size=(n, n))
    best = _best_by_brute_force(s)
    exact = max_weight_matching(s)
    assert matching_value(s, exact) == pytest.approx(best, abs=1e-9)
    assert matching_upper_bound(s) >= best - 1e-9
    near = round_matching(s)
    assert matching_value(s, near) <= best + 1e-9
    for pairs in (exact, near):
        nodes = [v for p in pairs for v in p]
        assert len(nodes) == len(set(nodes)) and all(s[i, j] >= s[j, i] and s[i, j] > 0 for i, j in pairs)


def test_whole_round_beats_greedy_where_greedy_blocks():
    from knexa_cpm.matching import matching_value, round_matching

    # greedy takes 0->1 (10) and is left with 2->3 (0.5); pairing 0->2 and 1->3 earns 18
    s = np.full((4, 4), -np.inf)
    s[0, 1], s[0, 2], s[1, 3], s[2, 3] = 10.0, 9.0, 9.0, 0.5
    assert matching_value(s, greedy_disjoint(s, None, np.random.default_rng(0))) == 10.5
    assert sorted(round_matching(s)) == [(0, 2), (1, 3)]
