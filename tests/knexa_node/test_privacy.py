"""Profile privacy: OS-CSPRNG noise the CPM cannot predict, an accountant that adds up, a budget
that freezes the profile, and all of it surviving a restart of a real NodeService."""

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
)
from knexa_node.service import NodeService
from knexa_p2p.identity import load_or_create_identity, load_or_create_kem_key
from protocol import HIST_SLICE, PERF_SLICE
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
    assert acc.summary() == {"noise": "laplace", "epsilon_per_round": 10.0, "epsilon_spent": 30.0,
                             "epsilon_budget": 35.0, "releases": 3, "frozen_releases": 1, "exhausted": True}
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
    svc.reload(dataclasses.replace(svc.cfg, profile_epsilon=10.0, profile_epsilon_budget=0.0))
    assert svc.privacy.epsilon == 10.0 and math.isinf(svc.privacy.budget) and svc.privacy.spent == 25.0


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
