"""Trust scores end to end: config -> service -> policy, experiments pass ids, and a poisoning
teacher is matched less and less in simulation (the poison world)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from knexa_cpm.config import CpmSection
from knexa_cpm.hybrid import HybridPolicy
from knexa_cpm.policies import LinUCBPolicy, make_policy
from knexa_cpm.service import CpmService
from knexa_cpm.sim_world import WorldConfig, draw_federation, poisoners
from knexa_cpm.simulate import COLUMNS, run_one


def _poison_share(policy: str, seeds: range, rounds: int = 40) -> tuple[float, float]:
    """Share of matches taught by a poisoner in the first 10 and the last 10 rounds (N = 16)."""
    first = last = 0.0
    bad_col, pairs_col, round_col = COLUMNS.index("bad_pairs"), COLUMNS.index("pairs"), COLUMNS.index("round")
    for seed in seeds:
        rows = run_one(WorldConfig(n=16, het="high", rounds=rounds, seed=seed, world="poison"), [policy])
        first += sum(r[bad_col] for r in rows if r[round_col] < 10) / sum(r[pairs_col] for r in rows if r[round_col] < 10)
        last += sum(r[bad_col] for r in rows if r[round_col] >= rounds - 10) / \
            sum(r[pairs_col] for r in rows if r[round_col] >= rounds - 10)
    return first / len(seeds), last / len(seeds)


@pytest.mark.parametrize("policy", ["linucb-interaction+trust", "hybrid+trust"])
def test_a_poisoning_teachers_share_of_matches_falls(policy):
    fed = draw_federation(WorldConfig(n=16, het="high", rounds=1, seed=0, world="poison"))
    assert len(poisoners(fed)) == 2  # 2 of 16 agents: a random pairing gives them ~1/16 of the teaching
    first, last = _poison_share(policy, range(3))
    assert last < first and last < 0.02


def test_trust_lowers_the_poisoners_share_against_the_same_policy_without_it():
    _, without = _poison_share("linucb-interaction", range(3))
    _, with_trust = _poison_share("linucb-interaction+trust", range(3))
    assert with_trust < without


@pytest.mark.parametrize("cls", [LinUCBPolicy, HybridPolicy])
def test_trust_needs_ids_and_only_penalises_that_teacher(cls):
    rng = np.random.default_rng(0)
    p = rng.random((4, 32))
    p[:, :8] = np.eye(4, 8)
    policy = cls(trust_weight=5.0, seed=1)
    for _ in range(6):
        policy.observe(p[0], p[1], -1.0, teacher_id="bad", student_id="s")
        policy.observe(p[2], p[3], +1.0, teacher_id="good", student_id="s2")
    assert policy.badness["bad"] > 0.7 and policy.badness["good"] == 0.0
    ids = ["bad", "x", "good", "y"]
    penalised = policy.pair_scores(p, 3, ids)
    policy.trust_weight = 0.0
    plain = policy.pair_scores(p, 3, ids) if cls is LinUCBPolicy else None
    if plain is not None:
        diff = plain - penalised
        assert (diff[0] > 1.0).all() and np.allclose(diff[1:], 0.0)


def test_cpm_config_carries_trust_to_the_policy(tmp_path: Path):
    svc = CpmService(CpmSection(federation="trust", state_dir=tmp_path, trust_weight=2.0, trust_rate=0.5))
    assert svc.policy.trust_weight == 2.0 and svc.policy.trust_rate == 0.5
    hybrid = CpmService(CpmSection(federation="trust", state_dir=tmp_path / "h", policy="hybrid", trust_weight=1.5))
    assert isinstance(hybrid.policy, HybridPolicy) and hybrid.policy.trust_weight == 1.5
    with pytest.raises(ValueError, match="trust"):
        CpmSection(trust_weight=-1.0)
    assert make_policy("hybrid", trust_weight=0.5).trust_weight == 0.5


def test_experiments_pass_client_names_so_trust_weight_takes_effect(tmp_path: Path):
    from knexa_lab.experiment.methods.p2p import KnexaFL

    method = KnexaFL()
    method.setup([SimpleNamespace(seed=1000 + i) for i in range(4)], {"trust_weight": 1.0}, tmp_path)
    assert method.policy.trust_weight == 1.0
    rng = np.random.default_rng(0)
    profiles = rng.random((4, 32))
    profiles[:, :8] = np.eye(4, 8)
    method.peer_ids = ["c0", "c1", "c2", "c3"]
    method.observe(0, 1, profiles, -0.5)
    assert method.policy.badness == {"c0": pytest.approx(0.2)}


def test_experiments_select_the_hybrid_by_name_and_resume_it(tmp_path: Path):
    from knexa_lab.experiment.methods.p2p import KnexaFL

    fake = [SimpleNamespace(seed=1000 + i) for i in range(4)]
    method = KnexaFL()
    method.setup(fake, {"policy": "hybrid", "trust_weight": 0.5}, tmp_path)
    assert isinstance(method.policy, HybridPolicy) and method.policy.trust_weight == 0.5
    rng = np.random.default_rng(1)
    profiles = rng.random((4, 32))
    profiles[:, :8] = np.eye(4, 8)
    method.peer_ids = ["c0", "c1", "c2", "c3"]
    for _ in range(5):
        method.observe(0, 1, profiles, float(rng.normal()))
    method.save(tmp_path)
    again = KnexaFL()
    again.setup(fake, {"policy": "hybrid", "trust_weight": 0.5}, tmp_path)
    again.load(tmp_path)
    ids = method.peer_ids
    assert again.policy.select(profiles, 3, peer_ids=ids) == method.policy.select(profiles, 3, peer_ids=ids)
    assert again.policy.teacher.n == {"c0": 5.0}
