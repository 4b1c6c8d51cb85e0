"""The method registry: lazy by "module:Class", clear errors for unknown or broken methods."""

from __future__ import annotations

import pytest

from knexa_lab.experiment import methods
from knexa_lab.experiment.methods import (
    P2P_METHODS,
    REGISTRY,
    MethodUnavailableError,
    UnknownMethodError,
    check_names,
    create_method,
    method_class,
)

OWN = {"local-only": "LocalOnly", "random-p2p": "RandomP2P", "heuristic-p2p": "HeuristicP2P",
       "knexa-fl": "KnexaFL", "knexa-fl-concat": "KnexaFLConcat", "knexa-fl-hybrid": "KnexaFLHybrid",
       "knexa-fl-skills": "KnexaFLSkills", "knexa-fl-compact": "KnexaFLCompact",
       "knexa-fl-prior": "KnexaFLPrior", "knexa-fl-prior-greedy": "KnexaFLPriorGreedy",
       "knexa-fl-prior-adaptive": "KnexaFLPriorAdaptive",
       "skill-gap-p2p": "SkillGapP2P", "fedavg": "FedAvg"}


def test_every_method_of_the_comparison_is_registered():
    assert set(REGISTRY) == {*OWN, "central-kd", "fedid-centralkd", "fedproxy", "oracle-p2p"}
    assert set(P2P_METHODS) <= set(REGISTRY)


@pytest.mark.parametrize("name", sorted(OWN))
def test_engine_methods_follow_the_contract(name):
    cls = method_class(name)
    assert cls.__name__ == OWN[name] and cls.name == name and cls.local_training is True
    m = create_method(name)
    for attr in ("setup", "communicate", "save", "load"):
        assert callable(getattr(m, attr))


def test_p2p_methods_differ_only_in_their_matchmaker():
    got = {n: (method_class(n).policy_name, method_class(n).context) for n in P2P_METHODS}
    assert got == {"random-p2p": ("random", "interaction"), "heuristic-p2p": ("heuristic", "interaction"),
                   "knexa-fl": ("linucb", "interaction"), "knexa-fl-concat": ("linucb", "concat"),
                   "knexa-fl-hybrid": ("hybrid", "interaction"), "knexa-fl-skills": ("hybrid", "interaction"),
                   "knexa-fl-compact": ("hybrid", "compact"), "knexa-fl-prior": ("hybrid", "compact"),
                   "knexa-fl-prior-greedy": ("hybrid", "compact"), "knexa-fl-prior-adaptive": ("hybrid", "compact"),
                   "skill-gap-p2p": ("skill_gap", "interaction")}
    # and in what their nodes send: only the skills methods share per-category skills by default
    assert {n for n in P2P_METHODS if method_class(n).defaults.get("share_skills")} == {
        "knexa-fl-skills", "knexa-fl-compact", "knexa-fl-prior", "knexa-fl-prior-greedy", "knexa-fl-prior-adaptive",
        "skill-gap-p2p"}
    # and only the prior methods start their hybrid from the skill prior; the greedy one never draws
    assert {n for n in P2P_METHODS if method_class(n).defaults.get("skill_prior")} == {
        "knexa-fl-prior", "knexa-fl-prior-greedy", "knexa-fl-prior-adaptive"}
    assert method_class("knexa-fl-prior-greedy").defaults["explore"] == 0.0
    assert {n for n in P2P_METHODS if method_class(n).defaults.get("adaptive_effects")} == {"knexa-fl-prior-adaptive"}


def test_unknown_names_are_listed_with_the_known_ones():
    with pytest.raises(UnknownMethodError, match="unknown methods fedsgd, scaffold; known: local-only"):
        check_names(["local-only", "fedsgd", "scaffold"])
    with pytest.raises(UnknownMethodError):
        create_method("fedsgd")


def test_a_missing_or_broken_module_is_unavailable_not_a_crash(monkeypatch):
    monkeypatch.setitem(REGISTRY, "ghost", "knexa_lab.experiment.methods.ghost_method:Ghost")
    with pytest.raises(MethodUnavailableError, match="ghost.*cannot import"):
        method_class("ghost")
    monkeypatch.setitem(REGISTRY, "nameless", "knexa_lab.experiment.methods.local:NoSuchClass")
    with pytest.raises(MethodUnavailableError, match="no class NoSuchClass"):
        method_class("nameless")


def test_register_checks_the_target(monkeypatch):
    monkeypatch.setattr(methods, "REGISTRY", dict(REGISTRY))
    methods.register("mine", "knexa_lab.experiment.methods.local:LocalOnly")
    assert methods.method_class("mine").__name__ == "LocalOnly"
    with pytest.raises(ValueError, match="package.module:Class"):
        methods.register("bad", "just_a_module")
