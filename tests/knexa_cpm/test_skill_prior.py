"""The hybrid's skill prior and the skill-gap policy: a prior pairs the first round by shared skill
gaps, the rewards overrule it, and it survives a restart; skill_gap matches without learning."""

from __future__ import annotations

import numpy as np
import pytest

from knexa_cpm.bandit import array_from_state, array_state
from knexa_cpm.config import CpmSection
from knexa_cpm.hybrid import HybridFeatures, HybridPolicy
from knexa_cpm.policies import make_policy

from .test_skill_rows import wire_profiles, with_skills

N = 8
IDS = [f"n{i}" for i in range(N)]


def _rows(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return with_skills(wire_profiles(N, seed), np.round(rng.random((N, 12)), 2))


def _total_gap(rows: np.ndarray, pairs: list[tuple[int, int]]) -> float:
    gap, _ = HybridFeatures.skill_gaps(rows)
    return float(sum(gap[t, s] for t, s in pairs))


def _best_total_gap(rows: np.ndarray) -> float:
    """Brute force over every way to split N agents into N/2 ordered pairs."""
    gap, _ = HybridFeatures.skill_gaps(rows)
    best = 0.0

    def walk(left: tuple[int, ...], acc: float) -> None:
        nonlocal best
        if not left:
            best = max(best, acc)
            return
        a = left[0]
        for b in left[1:]:
            rest = tuple(x for x in left[1:] if x != b)
            walk(rest, acc + max(gap[a, b], gap[b, a]))

    walk(tuple(range(len(rows))), 0.0)
    return best


def _prior_policy(seed: int, **kw: float) -> HybridPolicy:
    policy = make_policy("hybrid", context="compact", seed=seed, skill_prior=0.01, reward_scale=0.1, **kw)
    assert isinstance(policy, HybridPolicy)
    return policy


def test_skill_gap_policy_makes_the_round_of_largest_total_gap_and_ignores_rewards() -> None:
    for seed in range(4):
        rows = _rows(seed)
        policy = make_policy("skill_gap", seed=seed)
        pairs = policy.select(rows, 0)
        assert len(pairs) == N // 2
        assert _total_gap(rows, pairs) == pytest.approx(_best_total_gap(rows), abs=1e-4)
        for t, s in pairs:
            policy.observe(rows[t], rows[s], -1.0)
        assert _total_gap(rows, policy.select(rows, 1)) == pytest.approx(_best_total_gap(rows), abs=1e-4)
    # nodes that do not share skills have no gap to anyone: they are paired, but last
    rows = with_skills(wire_profiles(4, 9), np.eye(4, 12), np.array([True, True, False, False]))
    gap, _ = HybridFeatures.skill_gaps(rows)
    assert not gap[2:].any() and not gap[:, 2:].any()
    assert len(make_policy("skill_gap").select(rows, 0)) == 2


def test_the_skill_prior_pairs_the_first_round_by_skill_gaps_before_any_reward() -> None:
    """Thompson draws still explore (teacher effects above all), so the first round is not the
    best matching every time; on average it is far closer to it than a prior-free hybrid's."""
    prior, plain = [], []
    for seed in range(12):
        rows = _rows(seed)
        best = _best_total_gap(rows)
        prior.append(_total_gap(rows, _prior_policy(seed).select(rows, 0, peer_ids=IDS)) / best)
        blind = make_policy("hybrid", context="compact", seed=seed)
        plain.append(_total_gap(rows, blind.select(rows, 0, peer_ids=IDS)) / best)
    assert np.mean(prior) > 0.75, prior  # random pairs reach ~0.65 of the best total gap here
    assert np.mean(prior) > np.mean(plain) + 0.1, (prior, plain)  # without the prior, round 0 is a guess
    for seed in range(4):  # without the draw, round 0 is the skill-gap matching itself
        rows = _rows(seed)
        greedy = _prior_policy(seed, explore=0.0).select(rows, 0, peer_ids=IDS)
        assert _total_gap(rows, greedy) == pytest.approx(_best_total_gap(rows), abs=1e-4)


@pytest.mark.parametrize("explore", [0.3, 0.0])
def test_rewards_overrule_a_wrong_skill_prior(explore: float) -> None:
    """A federation where the shared skills mislead (teachers that claim more hurt more): the
    rewards must turn the skill-gap coefficient negative and the matching away from big gaps,
    with or without the Thompson draw (greedy learns from the pairs the prior chose)."""
    rng = np.random.default_rng(3)
    policy = _prior_policy(3, explore=explore)
    base = wire_profiles(N, 3)
    late, best = [], []
    for rnd in range(12):
        rows = with_skills(base, np.round(rng.random((N, 12)), 2))
        gap, _ = HybridFeatures.skill_gaps(rows)
        pairs = policy.select(rows, rnd, peer_ids=IDS)
        for t, s in pairs:
            policy.observe(rows[t], rows[s], -0.02 * gap[t, s] + rng.normal(0, 0.02), teacher_id=IDS[t],
                           student_id=IDS[s])
        if rnd >= 8:
            late.append(_total_gap(rows, pairs))
            best.append(_best_total_gap(rows))
    mu = np.linalg.solve(policy.A, policy.b)
    assert mu[-2] < 0, mu  # the skill-gap coefficient, started at +0.01
    assert np.mean(late) < 0.6 * np.mean(best), (late, best)


def test_the_skill_prior_is_part_of_the_saved_state_and_of_legacy_states() -> None:
    rows = _rows(1)
    a = _prior_policy(1)
    for rnd in range(3):
        for t, s in a.select(rows, rnd, peer_ids=IDS):
            a.observe(rows[t], rows[s], 0.05, teacher_id=IDS[t], student_id=IDS[s])
    b = _prior_policy(99)
    b.load_state_dict(a.state_dict())
    assert b.select(rows, 3, peer_ids=IDS) == a.select(rows, 3, peer_ids=IDS)
    # a full-context state saved before the skill terms: the new dims get the prior, not zeros
    full = HybridPolicy(seed=1, skill_prior=0.01)
    d, old = full.features.dim, full.features.dim_without_skills
    A, bb = full.A.copy(), full.b.copy()
    assert bb[d - 2] == pytest.approx((full.lam + full.skill_prior_weight) * 0.01) and not bb[:d - 2].any()
    for compact in (False, True):  # the prior sits on the coefficient of x's skill-gap column
        features = HybridFeatures(compact)
        x = features.build(rows[:1], rows[1:2], np.zeros(1))[0]
        assert x[features.gap_index] == pytest.approx(HybridFeatures.skill_gaps(rows[:2])[0][0, 1])
        assert features.gap_index == features.dim - 2
    legacy = {**full.state_dict(), "dim": old, "A": array_state(A[:old, :old]), "b": array_state(bb[:old])}
    c = HybridPolicy(seed=1, skill_prior=0.01)
    c.load_state_dict(legacy)
    assert np.array_equal(c.A, A) and np.array_equal(c.b, bb)
    assert np.array_equal(array_from_state(c.state_dict()["b"]), bb)


def test_skill_prior_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="skill_prior"):
        make_policy("hybrid", skill_prior=-0.1)
    with pytest.raises(ValueError, match="reward_scale"):
        HybridPolicy(reward_scale=0.0)
    with pytest.raises(ValueError, match="skill_prior"):
        CpmSection(skill_prior=-1.0)
    with pytest.raises(ValueError, match="reward_scale"):
        CpmSection(reward_scale=0.0)
    with pytest.raises(ValueError, match="explore"):
        CpmSection(explore=-0.1)
    assert make_policy("hybrid", explore=0.0).explore == 0.0
    assert make_policy("linucb", skill_prior=0.5).name == "linucb"  # one config serves every policy


def test_skill_gap_believes_a_member_that_claims_every_skill_whatever_its_students_report() -> None:
    """The documented limit of the non-learning matcher (docs/cpm.md): a liar teaches every round,
    because rewards never reach the scores; the hybrid demotes it (test_skill_rows.py)."""
    rng = np.random.default_rng(5)
    policy = make_policy("skill_gap", seed=5)
    base = wire_profiles(N, 5)
    for rnd in range(10):
        claimed = (rng.random((N, 12)) < 0.3).astype(float)
        claimed[0] = 1.0  # the liar
        rows = with_skills(base, claimed)
        pairs = policy.select(rows, rnd, peer_ids=IDS)
        assert any(t == 0 for t, _ in pairs), (rnd, pairs)
        for t, s in pairs:
            policy.observe(rows[t], rows[s], -0.1 if t == 0 else 0.05, teacher_id=IDS[t], student_id=IDS[s])


def _skills_world(kind: str, seed: int, rounds: int, *, liar: bool = False) -> tuple[float, int, HybridPolicy | None]:
    """A federation where the shared skills are the truth (bar an optional liar, node 0, that
    claims every skill and whose students lose 0.1): reward = 0.04 + 0.01 per teachable
    category + noise of sd 0.08 (the skills benchmark's reward scale), and a student learns each
    category it was taught with probability 1/2. Returns (teachable categories over all
    pairs and rounds, rounds the liar taught, the policy when it is a hybrid)."""
    rng = np.random.default_rng(seed)
    skills = (rng.random((N, 12)) < 0.3).astype(float)
    base = wire_profiles(N, seed)
    policy = (make_policy("skill_gap", seed=seed) if kind == "skill_gap"
              else _prior_policy(seed, adaptive_effects=kind == "adaptive"))
    total, liar_taught = 0.0, 0
    for rnd in range(rounds):
        claimed = skills.copy()
        if liar:
            claimed[0] = 1.0
        rows = with_skills(base, claimed)
        for t, s in policy.select(rows, rnd, peer_ids=IDS):
            teach = np.maximum(skills[t] - skills[s], 0.0)
            total += teach.sum()
            liar_taught += int(liar and t == 0)
            reward = 0.04 + 0.01 * teach.sum() + rng.normal(0, 0.08) - (0.1 if liar and t == 0 else 0.0)
            policy.observe(rows[t], rows[s], reward, teacher_id=IDS[t], student_id=IDS[s])
            skills[s][(teach > 0) & (rng.random(12) < 0.5)] = 1.0
    return total, liar_taught, policy if isinstance(policy, HybridPolicy) else None


def test_adaptive_teacher_effects_follow_the_noise_less_where_the_skills_explain_the_rewards() -> None:
    """With honest skills a fixed spread of teacher effects lets them wander with the reward
    noise (and draws exploration from them); the estimated spread stays near 0, so the matching
    stays nearer the skill-gap one, the best there is in this world."""
    fixed, adaptive, gap = ([_skills_world(kind, seed, 8)[0] for seed in range(24)]
                            for kind in ("fixed", "adaptive", "skill_gap"))
    assert np.mean(adaptive) > np.mean(fixed), (np.mean(adaptive), np.mean(fixed))
    assert np.mean(gap) >= np.mean(adaptive) - 1.0
    k = [p._teacher_k() for _, _, p in (_skills_world("adaptive", seed, 8) for seed in range(6)) if p]
    cap = 1.0 / HybridPolicy().tau_teacher ** 2
    assert sum(x > 4 * cap for x in k) >= 4, k  # estimated spread well under the fixed one, mostly


def test_adaptive_teacher_effects_rise_for_a_liar_and_demote_it() -> None:
    taught, ks = [], []
    for seed in range(8):
        _, liar_taught, policy = _skills_world("adaptive", seed, 20, liar=True)
        assert policy is not None
        taught.append(liar_taught)
        ks.append(policy._teacher_k())
    assert np.mean(taught) < 8, taught  # skill_gap lets it teach ~18 of 20 rounds
    assert all(np.isfinite(ks)), ks  # the liar's students make the spread real
    gap_taught = [_skills_world("skill_gap", seed, 20, liar=True)[1] for seed in range(8)]
    assert np.mean(gap_taught) > 15, gap_taught


def test_the_teacher_effect_spread_estimate() -> None:
    """Method of moments on the teachers' mean residuals, floored at 0 and capped at tau_teacher."""
    policy = HybridPolicy(adaptive_effects=True, reward_scale=0.1)
    assert policy._teacher_k() == np.inf  # no evidence, no effects
    for key, total in (("a", 0.3), ("b", -0.3)):
        policy.teacher.add(key, total)
    assert policy._teacher_k() == np.inf  # two teachers cannot show a spread
    policy.teacher.add("c", 0.0)
    # means 0.3, -0.3, 0: var (ddof 1) 0.09, noise 0.01 -> tau^2 sigma^2 0.08 -> k = 0.01 / 0.08
    assert policy._teacher_k() == pytest.approx(max(1 / policy.tau_teacher ** 2, 0.01 / 0.08))
    wide = HybridPolicy(adaptive_effects=True, tau_teacher=5.0, reward_scale=0.1)
    for key, total in (("a", 0.3), ("b", -0.3), ("c", 0.0)):
        wide.teacher.add(key, total)
    assert wide._teacher_k() == pytest.approx(0.01 / 0.08)  # under the cap: the estimate itself
    close = HybridPolicy(adaptive_effects=True, reward_scale=0.1)
    for key, total in (("a", 0.01), ("b", -0.01), ("c", 0.0)):
        close.teacher.add(key, total)
    assert close._teacher_k() == np.inf  # spread within the noise: no effects
    assert HybridPolicy(tau_teacher=0.5)._teacher_k() == 4.0  # fixed, the default


def test_the_cpm_builds_its_hybrid_from_the_config_keys(tmp_path) -> None:
    from knexa_cpm.config import CpmConfig
    from knexa_cpm.service import CpmService
    from knexa_runtime.config import load_config, parse_overrides

    keys = ["cpm.policy=hybrid", "cpm.context=compact", "cpm.skill_prior=0.01", "cpm.reward_scale=0.1",
            "cpm.explore=0.2", "cpm.adaptive_effects=true", f"cpm.state_dir={tmp_path}"]
    cfg = load_config(CpmConfig, None, parse_overrides(keys)).cpm
    policy = CpmService(cfg).policy
    assert isinstance(policy, HybridPolicy) and policy.features.compact
    assert (policy.skill_prior, policy.reward_scale, policy.explore, policy.adaptive_effects) == (0.01, 0.1, 0.2, True)
    assert CpmService(CpmSection(policy="hybrid", state_dir=tmp_path / "b")).policy.adaptive_effects is False
