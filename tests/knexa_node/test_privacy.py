"""Profile privacy: OS-CSPRNG noise the CPM cannot predict, an accountant that adds up, a budget
that freezes the profile, and all of it surviving a restart of a real NodeService; the opt-in
skills release (`share_skills`) charged, frozen and sent by a node's round."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import generate_latest

from knexa_node.config import NodeSection
from knexa_node.profile import (
    DEFAULT_EPSILON,
    DEFAULT_EPSILON_BUDGET,
    PrivacyAccountant,
    build_profile,
    laplace_noise,
    laplace_sensitivity,
    sanitize_profile,
    sanitize_skills,
    skills_vector,
)
from knexa_node.service import NodeService
from knexa_p2p.identity import load_or_create_identity, load_or_create_kem_key
from protocol import HIST_SLICE, PERF_SLICE, SKILLS_DIM, Profile, Reply, ReplyCode, decode, encode
from tests.support.fake_backend import FakeBackend

CPM_ID = "12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo"


def raw_profile() -> np.ndarray:
    return build_profile("qwen", [], np.arange(12, dtype=float) + 1)


def node(state_dir: Path, identity_dir: Path | None = None, **cfg: object) -> NodeService:
    ids = identity_dir or state_dir
    section = NodeSection(state_dir=state_dir, cpm=f"/ip4/127.0.0.1/tcp/1/p2p/{CPM_ID}", **cfg)  # type: ignore[arg-type]
    return NodeService(section, FakeBackend(), load_or_create_identity(ids / "identity.key"),
                       load_or_create_kem_key(ids / "kem.key"))


def noise_of(svc: NodeService, raw: np.ndarray) -> np.ndarray:
    """What the node adds (before clipping) on the dims it noises, read at 6 decimals."""
    return svc.privacy.release(raw, decimals=6)[PERF_SLICE] - np.round(raw[PERF_SLICE], 6)


def test_defaults_are_the_documented_ones() -> None:
    cfg = NodeSection()
    assert (cfg.profile_epsilon, cfg.profile_epsilon_budget) == (DEFAULT_EPSILON, DEFAULT_EPSILON_BUDGET)
    assert cfg.profile_epsilon > 0, "noise is on by default"
    assert cfg.share_skills is False, "skills reveal where a node is strong: opt-in"
    with pytest.raises(ValueError, match="profile_epsilon"):
        NodeSection(profile_epsilon=-1.0)
    with pytest.raises(ValueError, match="profile_epsilon_budget"):
        NodeSection(profile_epsilon_budget=math.nan)


def test_cpm_cannot_predict_the_noise_from_the_peer_id(tmp_path: Path) -> None:
    """The CPM knows the peer id (it is in every envelope). Two nodes with the *same* identity
    draw different noise, and regenerating the noise the node used to seed from its peer id
    recovers none of the true values (it recovered every unclipped one before)."""
    raw = raw_profile()
    a = node(tmp_path / "a", identity_dir=tmp_path / "id")
    b = node(tmp_path / "b", identity_dir=tmp_path / "id")
    assert a.me == b.me
    received = a.privacy.release(raw, decimals=6)
    assert not np.allclose(received[PERF_SLICE], b.privacy.release(raw, decimals=6)[PERF_SLICE])
    old = np.random.default_rng(int.from_bytes(a.me[-8:], "big"))
    regenerated = old.laplace(0.0, laplace_sensitivity() / a.privacy.epsilon, size=24)
    recovered = received[PERF_SLICE] - regenerated[:12]
    assert np.count_nonzero(np.abs(recovered - raw[PERF_SLICE]) < 1e-5) == 0


def test_a_restart_gives_fresh_noise_and_keeps_the_spent_budget(tmp_path: Path) -> None:
    raw = raw_profile()
    first = node(tmp_path)
    before = noise_of(first, raw)
    first._save_state()
    again = node(tmp_path)  # a restart from the same state directory
    assert again.privacy.spent == first.privacy.epsilon and again.privacy.releases == 1
    after = noise_of(again, raw)
    assert not np.allclose(before, after)
    assert again.privacy.spent == 2 * first.privacy.epsilon


def test_laplace_noise_from_the_os_has_the_right_scale() -> None:
    draws = laplace_noise(2.0, 20_000)
    assert draws.shape == (20_000,) and np.all(np.isfinite(draws))
    # E|X| = scale for Laplace(0, scale); 20k draws put the mean within a few percent
    assert abs(np.mean(np.abs(draws)) - 2.0) < 0.1
    assert abs(np.median(draws)) < 0.1
    assert not np.array_equal(laplace_noise(1.0, 8), laplace_noise(1.0, 8))
    with pytest.raises(ValueError):
        laplace_noise(0.0, 3)


def test_accountant_adds_up_and_freezes_at_the_budget() -> None:
    acc = PrivacyAccountant(10.0, budget=35.0)
    raw = raw_profile()
    sent = [acc.release(raw, decimals=6) for _ in range(3)]
    assert acc.spent == pytest.approx(30.0) and acc.releases == 3
    # a fourth fresh release would make 40 > 35: the budget counts as exhausted, and the profile
    # is frozen at the last noised one
    assert acc.exhausted
    frozen = acc.release(raw * 0 + build_profile("qwen", [], np.ones(12)), decimals=6)
    assert acc.exhausted and acc.spent == pytest.approx(30.0) and acc.frozen_releases == 1
    assert np.array_equal(frozen[PERF_SLICE], sent[-1][PERF_SLICE])
    assert np.array_equal(frozen[HIST_SLICE], sent[-1][HIST_SLICE])
    assert acc.summary() == {"noise": "laplace", "epsilon_per_release": 10.0, "epsilon_per_round": 10.0,
                             "epsilon_spent": 30.0,
                             "epsilon_budget": 35.0, "releases": 3, "frozen_releases": 1, "skills_releases": 0,
                             "exhausted": True}
    # raising the budget (SIGHUP) allows fresh releases again; what was spent stays spent
    acc.configure(10.0, 100.0)
    acc.release(raw)
    assert acc.spent == pytest.approx(40.0) and not acc.exhausted


def test_a_budget_below_one_release_sends_only_data_independent_features() -> None:
    acc = PrivacyAccountant(50.0, budget=10.0)
    out = acc.release(build_profile("gpt2", [], np.arange(12.0)))
    nothing_known = sanitize_profile(build_profile("gpt2", [], np.zeros(12)))
    assert np.array_equal(out, nothing_known) and acc.spent == 0.0


def test_noise_off_is_accounted_as_unbounded() -> None:
    acc = PrivacyAccountant(0.0)
    raw = raw_profile()
    assert np.array_equal(acc.release(raw), sanitize_profile(raw))
    summary = acc.summary()
    assert summary["noise"] == "off" and summary["epsilon_spent"] is None and summary["epsilon_budget"] is None


def test_accountant_state_round_trips_and_rejects_garbage() -> None:
    acc = PrivacyAccountant(5.0, 20.0)
    for _ in range(5):
        acc.release(raw_profile())
    copy = PrivacyAccountant(5.0, 20.0)
    copy.load_state(acc.to_state())
    assert copy.to_state() == acc.to_state() and copy.exhausted
    with pytest.raises(ValueError, match="dynamic dims"):
        copy.load_state({"spent": 1.0, "last": [0.5, 0.5]})


def test_status_and_metrics_show_the_spent_budget(tmp_path: Path) -> None:
    svc = node(tmp_path, profile_epsilon=25.0, profile_epsilon_budget=60.0)
    for _ in range(3):  # the third does not fit: 75 > 60
        svc.privacy.release(raw_profile())
    svc.metrics.observe_privacy(svc.privacy.summary())
    status = svc.status()["privacy"]
    assert (status["epsilon_spent"], status["epsilon_budget"], status["exhausted"]) == (50.0, 60.0, True)
    text = generate_latest(svc.metrics.registry).decode()
    assert "knexa_privacy_epsilon_spent 50.0" in text
    assert "knexa_privacy_epsilon_budget 60.0" in text
    assert "knexa_privacy_budget_exhausted 1.0" in text
    assert 'knexa_privacy_releases{kind="frozen"} 1.0' in text


def test_reload_changes_epsilon_but_not_what_was_spent(tmp_path: Path) -> None:
    import dataclasses

    svc = node(tmp_path, profile_epsilon=25.0)
    svc.privacy.release(raw_profile())
    svc.reload(dataclasses.replace(svc.cfg, profile_epsilon=10.0, profile_epsilon_budget=0.0, share_skills=True))
    assert svc.privacy.epsilon == 10.0 and math.isinf(svc.privacy.budget) and svc.privacy.spent == 25.0
    assert svc.cfg.share_skills  # turning skills on or off needs no restart


def test_a_mid_round_save_does_not_record_the_rounds_evaluation_twice(tmp_path: Path) -> None:
    """The budget is saved before the profile is sent, i.e. mid-round: a crash there re-runs the
    round, which must not leave its evaluation in the history twice."""
    from knexa_node.profile import PerfPoint

    svc = node(tmp_path)
    svc.history.append(PerfPoint(0.5, 0.5, 2.0))  # this round's evaluation, round not completed
    svc.privacy.release(raw_profile())
    svc._save_state()
    restarted = node(tmp_path)
    assert restarted.history == [] and restarted.privacy.releases == 1
    svc.completed += 1
    svc._save_state()
    assert node(tmp_path).history == [PerfPoint(0.5, 0.5, 2.0)]


# ---- skills (share_skills) ----------------------------------------------------------------------

SKILLS = np.linspace(0.0, 1.0, SKILLS_DIM)


def test_a_skills_release_is_charged_like_a_profile_release() -> None:
    acc = PrivacyAccountant(10.0, budget=100.0)
    acc.release(raw_profile())
    out = acc.release_skills(SKILLS, decimals=6)
    assert out is not None and out.shape == (SKILLS_DIM,) and np.all((out >= 0) & (out <= 1))
    assert not np.array_equal(out, np.round(SKILLS, 6))  # noised
    assert acc.spent == pytest.approx(20.0) and acc.releases == 1 and acc.skills_releases == 1
    assert acc.summary()["skills_releases"] == 1 and acc.summary()["epsilon_spent"] == 20.0
    # what status reports per round follows the node's setting, not a guess from past releases
    assert acc.summary()["epsilon_per_round"] == 10.0
    acc.configure(10.0, 100.0, shares_skills=True)
    assert acc.summary()["epsilon_per_round"] == 20.0 and acc.summary()["epsilon_per_release"] == 10.0
    assert PrivacyAccountant(5.0, shares_skills=True).summary()["epsilon_per_round"] == 10.0


def test_skills_freeze_at_the_last_release_once_the_budget_is_spent() -> None:
    acc = PrivacyAccountant(10.0, budget=30.0)
    acc.release(raw_profile())
    first = acc.release_skills(SKILLS)
    acc.release(raw_profile())  # 30 of 30: nothing more fits
    assert acc.exhausted and acc.spent == pytest.approx(30.0)
    for _ in range(2):
        again = acc.release_skills(np.zeros(SKILLS_DIM))  # post-processing: free, same values
        assert again is not None and np.array_equal(again, first)
    assert acc.spent == pytest.approx(30.0) and acc.skills_releases == 1
    again[0] = 0.5  # a copy: the caller cannot change what is remembered
    assert np.array_equal(acc.release_skills(SKILLS), first)
    with pytest.raises(ValueError, match="non-finite"):  # still validated when frozen
        acc.release_skills(np.full(SKILLS_DIM, np.nan))


def test_no_skills_when_the_budget_was_spent_before_any_release() -> None:
    acc = PrivacyAccountant(10.0, budget=10.0)
    acc.release(raw_profile())
    assert acc.release_skills(SKILLS) is None
    assert acc.spent == pytest.approx(10.0) and acc.skills_releases == 0 and acc.last_skills is None


def test_skills_with_noise_off_are_exact_and_accounted_as_unbounded() -> None:
    acc = PrivacyAccountant(0.0)
    out = acc.release_skills(SKILLS, decimals=2)
    assert out is not None and np.array_equal(out, sanitize_skills(SKILLS, decimals=2))
    assert acc.unnoised_releases == 1 and acc.summary()["epsilon_spent"] is None


def test_skills_survive_the_state_round_trip_and_old_states_load() -> None:
    acc = PrivacyAccountant(10.0, budget=20.0)
    acc.release(raw_profile())
    sent = acc.release_skills(SKILLS)
    copy = PrivacyAccountant(10.0, budget=20.0)
    copy.load_state(acc.to_state())
    assert copy.to_state() == acc.to_state() and copy.skills_releases == 1
    assert np.array_equal(copy.release_skills(SKILLS), sent)  # exhausted: frozen at the saved one
    old = {k: v for k, v in acc.to_state().items() if k not in ("skills_releases", "last_skills")}
    legacy = PrivacyAccountant(10.0, budget=20.0)
    legacy.load_state(old)  # saved before skills existed
    assert legacy.skills_releases == 0 and legacy.last_skills is None and legacy.spent == pytest.approx(20.0)
    assert legacy.release_skills(SKILLS) is None
    with pytest.raises(ValueError, match="skills"):
        copy.load_state({**acc.to_state(), "last_skills": [0.5] * 3})


# A node's round in process: the CPM's side is a stub that records the profiles it is sent and
# answers ok; no directive comes, so the round ends as "no_directive" after integrate_local.


async def run_rounds(svc: NodeService, n: int) -> list[Profile]:
    sent: list[Profile] = []

    async def no_public_set_check(host: object) -> None:
        return None

    async def submit(host: object, msg: object) -> Reply:
        assert isinstance(msg, Profile)
        sent.append(decode(encode(msg), Profile))  # what the CPM reads off the wire
        return Reply(True, ReplyCode.OK, "", svc.round)

    async def no_directive(host: object, round_: int) -> None:
        return None

    svc._check_public_set = no_public_set_check  # type: ignore[method-assign]
    svc.submit = submit  # type: ignore[method-assign]
    svc.wait_directive = no_directive  # type: ignore[method-assign]
    for _ in range(n):
        await svc.run_round(None)  # type: ignore[arg-type]
    return sent


async def test_a_node_sends_no_skills_by_default(tmp_path: Path) -> None:
    svc = node(tmp_path)
    calls: list[int] = []
    svc.backend.validation_skills = lambda: calls.append(1) or (0.0, {})  # type: ignore[method-assign]
    (profile,) = await run_rounds(svc, 1)
    assert profile.skills == () and b"skills" not in encode(profile)
    assert calls == [] and svc.privacy.spent == pytest.approx(svc.privacy.epsilon)
    assert svc.privacy.skills_releases == 0 and "skills" not in svc.round_phases


async def test_a_node_that_shares_skills_sends_12_values_and_pays_for_them(tmp_path: Path,
                                                                              caplog: pytest.LogCaptureFixture) -> None:
    svc = node(tmp_path, share_skills=True, profile_epsilon=10.0, profile_epsilon_budget=30.0)
    with caplog.at_level("INFO", logger="knexa_node"):
        sent = await run_rounds(svc, 3)
    first, second, third = (p.skills for p in sent)
    assert len(first) == SKILLS_DIM and all(0.0 <= x <= 1.0 for x in first)
    # round 0: profile + skills (20); round 1: the profile fits (30), the skills do not and are
    # re-sent as released in round 0; round 2: both frozen
    assert second == first and third == first
    assert svc.privacy.spent == pytest.approx(30.0) and svc.privacy.releases == 2
    assert svc.privacy.skills_releases == 1 and "skills" in svc.round_phases
    lines = [r.getMessage() for r in caplog.records if "skills" in r.getMessage()]
    assert lines == ["round=0 skills: shared (fresh release)",
                     "round=1 skills: shared (frozen at the last release: budget spent)",
                     "round=2 skills: shared (frozen at the last release: budget spent)"]
    # a restart keeps what was released: the frozen skills are still sent
    (after,) = await run_rounds(node(tmp_path, share_skills=True, profile_epsilon=10.0,
                                     profile_epsilon_budget=30.0), 1)
    assert after.skills == first


async def test_skills_are_the_backends_validation_pass_rates_in_category_order(tmp_path: Path) -> None:
    svc = node(tmp_path, share_skills=True, profile_epsilon=0.0)
    measured: list[dict[str, float]] = []
    real = svc.backend.validation_skills

    def recorded() -> tuple[float, dict[str, float]]:
        overall, per_cat = real()
        measured.append(per_cat)
        return overall, per_cat

    svc.backend.validation_skills = recorded  # type: ignore[method-assign]
    (profile,) = await run_rounds(svc, 1)
    (per_cat,) = measured  # once per round
    assert profile.skills == tuple(sanitize_skills(skills_vector(per_cat)).tolist())
    assert profile.skills[-1] == 0.0 and min(profile.skills[:-1]) > 0  # "other": no validation problem


async def test_no_skills_are_sent_when_none_was_ever_released(tmp_path: Path) -> None:
    svc = node(tmp_path, share_skills=True, profile_epsilon=10.0, profile_epsilon_budget=10.0)
    (profile,) = await run_rounds(svc, 1)
    assert profile.skills == () and svc.privacy.spent == pytest.approx(10.0)
