"""Profile rows with skills: every policy but hybrid ignores them; hybrid learns from the skill gap."""

from __future__ import annotations

import numpy as np
import pytest

from knexa_cpm.hybrid import HybridFeatures, HybridPolicy
from knexa_cpm.policies import ROW_DIM, SKILLS_SLICE, UNKNOWN_SKILL, make_policy, profile_row
from protocol import FAMILY_SLICE, HIST_SLICE, PERF_SLICE, PROFILE_DIM, SKILLS_DIM


def wire_profiles(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = np.zeros((n, PROFILE_DIM))
    p[np.arange(n), FAMILY_SLICE.start + rng.integers(0, 3, n)] = 1.0
    p[:, PERF_SLICE] = np.round(rng.random((n, 12)), 2)
    p[:, HIST_SLICE] = np.round(rng.dirichlet(np.full(12, 0.3), n), 2)
    return p


def with_skills(p: np.ndarray, skills: np.ndarray, shared: np.ndarray | None = None) -> np.ndarray:
    shared = np.ones(len(p), dtype=bool) if shared is None else shared
    return np.array([profile_row(v, k if ok else ()) for v, k, ok in zip(p, skills, shared, strict=True)])


def test_profile_row_layout() -> None:
    v = [0.5] * PROFILE_DIM
    assert profile_row(v) == v + [UNKNOWN_SKILL] * SKILLS_DIM
    assert profile_row(v, [0.25] * SKILLS_DIM)[SKILLS_SLICE] == [0.25] * SKILLS_DIM
    assert len(profile_row(v)) == ROW_DIM
    with pytest.raises(ValueError, match="skills"):
        profile_row(v, [0.5] * 3)


@pytest.mark.parametrize("name", ["linucb", "random", "heuristic", "round_robin"])
def test_policies_other_than_hybrid_choose_the_same_with_or_without_skill_columns(name: str) -> None:
    p = wire_profiles(9)
    rows = with_skills(p, np.random.default_rng(1).random((9, SKILLS_DIM)))
    a, b = make_policy(name, seed=4), make_policy(name, seed=4)
    for t in range(4):
        pairs = a.select(p, t)
        assert pairs == b.select(rows, t)
        for i, j in pairs:
            a.observe(p[i], p[j], 0.1 * i)
            b.observe(rows[i], rows[j], 0.1 * i)


@pytest.mark.parametrize("compact", [False, True])
def test_hybrid_vectorized_scores_equal_theta_dot_each_pairs_context(compact: bool) -> None:
    n = 7
    rng = np.random.default_rng(2)
    shared = np.array([True, True, False, True, True, False, True])
    rows = with_skills(wire_profiles(n, 2), np.round(rng.random((n, SKILLS_DIM)), 2), shared)
    feats = HybridFeatures(compact)
    assert feats.dim == (5 if compact else HybridFeatures().dim)
    theta = rng.normal(size=feats.dim)
    recency = rng.random((n, n))
    fast = feats.scores(rows, theta, recency)
    for i in range(n):
        for j in range(n):
            x = feats.build(rows[i], rows[j], np.array([recency[i, j]]))[0]
            assert fast[i, j] == pytest.approx(float(x @ theta), abs=1e-9)
    gap, both = feats.skill_gaps(rows)
    assert not both[2].any() and not both[:, 5].any() and both[0, 1] == 1.0
    k = rows[:, SKILLS_SLICE]
    assert gap[0, 1] == pytest.approx(np.maximum(k[0] - k[1], 0).sum())
    assert gap[2, 0] == 0.0


def _teachable(skills: np.ndarray, t: int, s: int) -> float:
    return float(np.maximum(skills[t] - skills[s], 0.0).sum())


def _mean_teachable(share: bool, seed: int, compact: bool = False, rounds: int = 40, noise: float = 0.02) -> float:
    """Agents whose rewards are the categories their teacher can add, plus noise: the mean
    teachable gain of the pairs hybrid picks in the second half of a federation that learns."""
    rng = np.random.default_rng(seed)
    n = 10
    p = wire_profiles(n, seed)
    policy = HybridPolicy(seed=seed, compact=compact)
    ids = [f"n{i}" for i in range(n)]
    picked = []
    for rnd in range(rounds):
        skills = (rng.random((n, SKILLS_DIM)) < 0.3).astype(float)  # fresh skills every round
        rows = with_skills(p, skills) if share else p
        pairs = policy.select(rows, rnd, peer_ids=ids)
        for t, s in pairs:
            gain = _teachable(skills, t, s)
            policy.observe(rows[t], rows[s], 0.02 * gain + rng.normal(0, noise), teacher_id=ids[t], student_id=ids[s])
            if rnd >= rounds // 2:
                picked.append(gain)
    return float(np.mean(picked))


def test_hybrid_picks_teachable_pairs_when_nodes_share_skills() -> None:
    """Skills drawn afresh each round leave nothing else to learn: only the skill gap tells a
    good pair, and the hybrid must find it from noisy rewards (random pairs average 2.5 here)."""
    shared = [_mean_teachable(True, s) for s in range(3)]
    blind = [_mean_teachable(False, s) for s in range(3)]
    assert min(shared) > max(blind) + 1.0, (shared, blind)


def test_compact_hybrid_needs_fewer_rewards_to_use_the_skill_gap() -> None:
    """Five terms instead of ~150, after 8 rounds of 5 pairs (the skills benchmark's budget) of
    rewards as noisy as the benchmark's (their correlation with the teachable gain is ~0.25)."""
    from knexa_cpm.policies import make_policy

    compact = [_mean_teachable(True, s, compact=True, rounds=8, noise=0.1) for s in range(4)]
    full = [_mean_teachable(True, s, rounds=8, noise=0.1) for s in range(4)]
    assert np.mean(compact) > np.mean(full) + 0.3, (compact, full)
    assert make_policy("hybrid", context="compact").features.dim == 5
    assert make_policy("hybrid", context="interaction").features.dim > 100
    with pytest.raises(ValueError, match="hybrid context"):
        make_policy("hybrid", context="wide")


def test_hybrid_state_saved_before_the_skill_terms_loads_as_no_data_on_them() -> None:
    p = wire_profiles(6)
    a = HybridPolicy(seed=1)
    for rnd in range(5):
        for t, s in a.select(p, rnd):
            a.observe(p[t], p[s], 0.1)
    state = a.state_dict()
    d, old = a.features.dim, a.features.dim_without_skills
    from knexa_cpm.bandit import array_from_state, array_state

    A, b = array_from_state(state["A"]), array_from_state(state["b"])
    assert np.allclose(A[old:, :], np.eye(d)[old:, :] * a.lam) and not b[old:].any()  # never seen: prior
    legacy = {**state, "dim": old, "A": array_state(A[:old, :old]), "b": array_state(b[:old])}
    c = HybridPolicy(seed=1)
    c.load_state_dict(legacy)
    assert np.array_equal(c.A, A) and np.array_equal(c.b, b)
    assert c.select(p, 5) == a.select(p, 5)
    with pytest.raises(ValueError, match="dim"):
        c.load_state_dict({**legacy, "dim": old - 1})


@pytest.mark.parametrize("adaptive", [False, True])
def test_a_member_that_claims_every_skill_stops_teaching_once_its_students_report_losses(adaptive: bool) -> None:
    """Skills are the member's own claim: one that says it solves everything is matched as a
    teacher at first, and its students' negative rewards then take it out of the teacher role
    (with a fixed spread of teacher effects, and with one estimated from the rewards)."""
    rng = np.random.default_rng(7)
    n = 8
    p = wire_profiles(n, 7)
    ids = [f"n{i}" for i in range(n)]
    policy = HybridPolicy(seed=7, adaptive_effects=adaptive)
    taught = []
    for rnd in range(30):
        skills = (rng.random((n, SKILLS_DIM)) < 0.3).astype(float)
        claimed = skills.copy()
        claimed[0] = 1.0  # the liar
        rows = with_skills(p, claimed)
        pairs = policy.select(rows, rnd, peer_ids=ids)
        taught.append(any(t == 0 for t, _ in pairs))
        for t, s in pairs:
            reward = -0.1 if t == 0 else 0.02 * _teachable(skills, t, s)
            policy.observe(rows[t], rows[s], reward + rng.normal(0, 0.02), teacher_id=ids[t], student_id=ids[s])
    assert sum(taught[:5]) >= 3, taught  # believed at first
    assert sum(taught[-10:]) <= 2, taught  # then demoted
