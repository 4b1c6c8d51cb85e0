"""FedAvg's averaging and its refusal to mix architectures; the P2P matchmaker's saved state."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from knexa_lab.experiment.methods.fedavg import ArchitectureMismatch, FedAvg, average_adapters
from knexa_lab.experiment.methods.p2p import KnexaFL, KnexaFLConcat, RandomP2P, policy_seed

from .conftest import tiny_config


@pytest.fixture(scope="module")
def clients(tmp_path_factory, model_cache):
    """tiny-gpt2, tiny-llama, tiny-gpt2 on one split, as the engine builds them."""
    from knexa_lab.experiment.engine import build_clients, prepare_split

    cfg = tiny_config()
    data = prepare_split(cfg, 1, tmp_path_factory.mktemp("split"))
    return build_clients(cfg, 1, data, model_cache)


def _adapter(client):
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(client.backend.model).items()}


def _fill(client, value):
    with torch.no_grad():
        for p in client.backend.model.parameters():
            if p.requires_grad:
                p.fill_(value)


def test_fedavg_refuses_to_average_across_architectures(clients, tmp_path):
    with pytest.raises(ArchitectureMismatch, match=r"client-0 \(tiny-gpt2, gpt2\).*client-1 \(tiny-llama, llama\)"):
        average_adapters([clients[0], clients[1]])
    with pytest.raises(ArchitectureMismatch, match="one model only"):
        FedAvg().setup(clients, {"groups": [[0, 1]]}, tmp_path)


@pytest.mark.parametrize(("settings", "needle"), [
    ({"groups": [[0, 2], [2]]}, "disjoint"),
    ({"groups": [[0, 7]]}, "client indices"),
    ({"weights": "uniform"}, "unknown settings"),
])
def test_fedavg_bad_settings(clients, tmp_path, settings, needle):
    with pytest.raises(ValueError, match=needle):
        FedAvg().setup(clients, settings, tmp_path)


def test_fedavg_weighted_average_of_a_same_model_group(clients, tmp_path):
    a, b, lone = clients[0], clients[2], clients[1]
    base = [c.backend.base_fingerprint() for c in clients]
    lone_before = _adapter(lone)
    _fill(a, 1.0)
    _fill(b, 5.0)
    size = average_adapters([a, b], weights=[1.0, 3.0])
    for state in (_adapter(a), _adapter(b)):
        for t in state.values():
            assert torch.allclose(t, torch.full_like(t, 0.25 * 1.0 + 0.75 * 5.0))
    assert size == sum(t.numel() * t.element_size() for t in _adapter(a).values()) > 0

    method = FedAvg()
    method.setup(clients, {}, tmp_path)
    assert method.groups == [[0, 2]]  # grouped by model; tiny-llama alone
    _fill(a, 2.0)
    _fill(b, 4.0)
    steps = method.aggregate(clients)
    n_a, n_b = len(a.backend.data.train), len(b.backend.data.train)
    expect = (n_a * 2.0 + n_b * 4.0) / (n_a + n_b)  # weighted by training-set size
    assert all(torch.allclose(t, torch.full_like(t, expect)) for t in _adapter(b).values())
    assert set(steps) == {0, 2} and steps[0].role == "aggregated" and steps[0].bytes_received == size
    assert all(torch.equal(lone_before[k], v) for k, v in _adapter(lone).items())
    assert [c.backend.base_fingerprint() for c in clients] == base


def test_p2p_matchmaker_state_survives_save_and_load(tmp_path):
    fake = [SimpleNamespace(seed=1000 + i) for i in range(4)]
    rng = np.random.default_rng(0)
    method = KnexaFL()
    method.setup(fake, {"beta0": 0.5}, tmp_path)
    profiles = rng.random((4, 32))
    profiles[:, :8] = np.eye(4, 8)
    for _ in range(3):
        method.policy.observe(profiles[0], profiles[1], float(rng.normal()))
    method.save(tmp_path)
    again = KnexaFL()
    again.setup(fake, {"beta0": 0.5}, tmp_path)
    again.load(tmp_path)
    assert again.policy.select(profiles, 3) == method.policy.select(profiles, 3)
    assert again.policy.bandit.n_updates == 3
    concat = KnexaFLConcat()
    concat.setup(fake, {}, tmp_path)
    with pytest.raises(ValueError, match="context"):
        concat.load(tmp_path)  # a bandit learned on another context must not be loaded silently


def test_p2p_policy_seed_follows_the_experiment_seed(tmp_path):
    seeds_1 = [SimpleNamespace(seed=1000 + i) for i in range(3)]
    seeds_2 = [SimpleNamespace(seed=2000 + i) for i in range(3)]
    assert policy_seed([1000, 1001, 1002]) == policy_seed([1000, 1001, 1002]) != policy_seed([2000, 2001, 2002])
    a, b = RandomP2P(), RandomP2P()
    a.setup(seeds_1, {}, tmp_path)
    b.setup(seeds_2, {}, tmp_path)
    assert a.settings["seed"] != b.settings["seed"]
    with pytest.raises(ValueError, match="unknown settings"):
        RandomP2P().setup(seeds_1, {"bet0": 1.0}, tmp_path)


def test_knexa_fl_skills_sends_each_nodes_sanitized_validation_skills_with_its_profile(clients, tmp_path):
    from knexa_cpm.policies import ROW_DIM, SKILLS_SLICE
    from knexa_lab.experiment.methods.base import RoundContext
    from knexa_lab.experiment.methods.p2p import KnexaFLHybrid, KnexaFLSkills
    from knexa_node.profile import skills_vector

    def rows(method):
        method.setup(clients, {"profile_epsilon": 0}, tmp_path / method.name)
        ctx = RoundContext(round_idx=0, total_rounds=1, clients=clients, rng=np.random.default_rng(0), history={},
                           settings={}, workdir=tmp_path)
        return method.profiles(ctx)

    shared, plain = rows(KnexaFLSkills()), rows(KnexaFLHybrid())
    assert shared.shape == (len(clients), ROW_DIM) and plain.shape == (len(clients), 32)
    assert np.array_equal(shared[:, :32], plain)  # the wire profile itself is unchanged
    for c, row in zip(clients, shared, strict=True):  # noise off: the node's own skills, rounded
        assert np.allclose(row[SKILLS_SLICE], np.round(skills_vector(c.backend.validation_skills()[1]), 2))


def test_daemons_mode_turns_skills_sharing_on_in_the_nodes_of_the_skills_methods_only():
    from knexa_lab.experiment.config import resolve_config
    from knexa_lab.experiment.daemons import _daemon_configs

    cfg = resolve_config("tiny")
    cpm, node = _daemon_configs(cfg, "knexa-fl-skills", 1)
    assert cpm["policy"] == "hybrid" and node["share_skills"] is True
    assert _daemon_configs(cfg, "knexa-fl-hybrid", 1)[1]["share_skills"] is False
    cpm, node = _daemon_configs(cfg, "knexa-fl-compact", 1)
    assert (cpm["policy"], cpm["context"], node["share_skills"]) == ("hybrid", "compact", True)
    assert (cpm["skill_prior"], cpm["reward_scale"], cpm["explore"]) == (0.0, 1.0, 0.3)  # the CPM's defaults
    assert _daemon_configs(cfg, "knexa-fl-prior-greedy", 1)[0]["explore"] == 0.0
    assert cpm["adaptive_effects"] is False and _daemon_configs(cfg, "knexa-fl-prior-adaptive", 1)[0][
        "adaptive_effects"] is True
    cpm, node = _daemon_configs(cfg, "knexa-fl-prior", 1)
    assert (cpm["policy"], cpm["context"], cpm["skill_prior"], cpm["reward_scale"], node["share_skills"]) == (
        "hybrid", "compact", 0.01, 0.1, True)
    from knexa_cpm.config import CpmSection

    CpmSection(**{k: v for k, v in cpm.items() if k != "seed"})  # a config knexa-cpm serve accepts


def test_the_prior_methods_build_the_matchmaker_their_settings_name(clients, tmp_path):
    from knexa_cpm.hybrid import HybridFeatures, HybridPolicy
    from knexa_cpm.policies import SkillGapPolicy
    from knexa_lab.experiment.methods.base import RoundContext
    from knexa_lab.experiment.methods.p2p import (
        KnexaFLPrior,
        KnexaFLPriorAdaptive,
        KnexaFLPriorGreedy,
        SkillGapP2P,
    )

    prior, greedy, gap, adaptive = KnexaFLPrior(), KnexaFLPriorGreedy(), SkillGapP2P(), KnexaFLPriorAdaptive()
    for m in (prior, greedy, gap, adaptive):
        m.setup(clients, {"profile_epsilon": 0}, tmp_path / m.name)
    assert isinstance(prior.policy, HybridPolicy) and prior.policy.features.compact
    assert (prior.policy.skill_prior, prior.policy.reward_scale, prior.policy.explore) == (0.01, 0.1, 0.3)
    assert greedy.policy.explore == 0.0 and greedy.policy.skill_prior == 0.01
    assert not prior.policy.adaptive_effects and adaptive.policy.adaptive_effects
    assert (adaptive.policy.skill_prior, adaptive.policy.explore) == (0.01, 0.3)
    with pytest.raises(ValueError, match="adaptive_effects must be true or false, got 'false'"):
        KnexaFLPriorAdaptive().setup(clients, {"adaptive_effects": "false"}, tmp_path / "bad")
    assert isinstance(gap.policy, SkillGapPolicy)
    ctx = RoundContext(round_idx=0, total_rounds=1, clients=clients, rng=np.random.default_rng(0), history={},
                       settings={}, workdir=tmp_path)
    rows = gap.profiles(ctx)  # the nodes' shared skills: the skill gaps both matchers see
    scores, _ = HybridFeatures.skill_gaps(rows)
    ids = [c.name for c in clients]

    def total(pairs):
        return sum(scores[t, s] for t, s in pairs)

    # greedy's first round is the skill-gap matching itself (the same total gap; ties may differ)
    assert total(greedy.policy.select(rows, 0, peer_ids=ids)) == pytest.approx(
        total(gap.policy.select(rows, 0, peer_ids=ids)), abs=1e-4)
