"""LinUCB: learns a known linear model, sub-linear regret, Sherman-Morrison/Woodbury accuracy, state."""

import msgpack
import numpy as np
import pytest

from knexa_cpm.bandit import LinUCB, array_from_state, array_state


def test_recovers_known_theta():
    rng = np.random.default_rng(0)
    d = 8
    theta = rng.normal(size=d)
    bandit = LinUCB(d, lam=0.01)
    for _ in range(3000):
        x = rng.normal(size=d)
        bandit.update(x, float(theta @ x + 0.1 * rng.normal()))
    np.testing.assert_allclose(bandit.theta, theta, atol=0.02)


def test_regret_is_sublinear_on_a_stationary_problem():
    rng = np.random.default_rng(1)
    d, arms, rounds = 6, 30, 2000
    theta = rng.normal(size=d)
    contexts = rng.normal(size=(arms, d))
    means = contexts @ theta
    bandit = LinUCB(d, lam=1.0)
    regret = np.empty(rounds)
    for t in range(rounds):
        a = int(np.argmax(bandit.ucb(contexts, beta=1.0)))
        bandit.update(contexts[a], float(means[a] + rng.normal()))
        regret[t] = means.max() - means[a]
    cum = np.cumsum(regret)
    first, last = cum[rounds // 2 - 1], cum[-1] - cum[rounds // 2 - 1]
    assert last < first / 2, (first, last)
    assert regret[-200:].mean() < 0.05 * regret[:200].mean() + 1e-9


def test_sherman_morrison_stays_close_to_inverse():
    rng = np.random.default_rng(2)
    d = 64
    bandit = LinUCB(d, lam=0.01, reinvert_every=0)  # never re-invert: measure raw drift
    for _ in range(5000):
        bandit.update(rng.normal(size=d) * rng.uniform(0.1, 3.0), float(rng.normal()))
    exact = np.linalg.inv(bandit.A)
    rel = np.abs(bandit.A_inv - exact).max() / np.abs(exact).max()
    assert rel < 1e-8
    assert bandit.drift() < 1e-8
    bandit.reinvert()
    assert bandit.drift() < 1e-12


def test_periodic_reinversion_resets_counter():
    rng = np.random.default_rng(3)
    bandit = LinUCB(4, reinvert_every=10)
    for _ in range(25):
        bandit.update(rng.normal(size=4), 1.0)
    assert bandit.n_updates == 25 and bandit._since_inv == 5


@pytest.mark.parametrize("k", [1, 5, 40, 200])  # below and above d: Woodbury and re-inversion paths
def test_batch_update_equals_sequential(k):
    rng = np.random.default_rng(k)
    d = 16
    x, r = rng.normal(size=(k, d)), rng.normal(size=k)
    seq, bat = LinUCB(d, reinvert_every=0), LinUCB(d, reinvert_every=0)
    seq.update(rng.normal(size=d), 0.3)
    bat.load_state_dict(seq.state_dict())  # start both from the same non-trivial state
    for xi, ri in zip(x, r, strict=True):
        seq.update(xi, ri)
    bat.update_batch(x, r)
    np.testing.assert_allclose(bat.A, seq.A, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(bat.b, seq.b, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(bat.A_inv, seq.A_inv, rtol=1e-7, atol=1e-7)
    assert bat.n_updates == seq.n_updates


def test_ucb_matches_formula():
    rng = np.random.default_rng(4)
    bandit = LinUCB(5)
    for _ in range(50):
        bandit.update(rng.normal(size=5), float(rng.normal()))
    x = rng.normal(size=(7, 5))
    expect = x @ bandit.theta + 0.5 * np.sqrt(np.einsum("ij,jk,ik->i", x, np.linalg.inv(bandit.A), x))
    np.testing.assert_allclose(bandit.ucb(x, 0.5, block_rows=3), expect, rtol=1e-9)


def test_state_round_trip_is_exact_and_msgpack_safe():
    rng = np.random.default_rng(5)
    bandit = LinUCB(6, lam=0.5, reinvert_every=7)
    for _ in range(20):
        bandit.update(rng.normal(size=6), float(rng.normal()))
    packed = msgpack.packb(bandit.state_dict(), use_bin_type=True)
    clone = LinUCB.from_state_dict(msgpack.unpackb(packed, raw=False))
    for name in ("A", "A_inv", "b"):
        assert getattr(clone, name).tobytes() == getattr(bandit, name).tobytes()
    assert (clone.n_updates, clone.lam, clone.reinvert_every, clone._since_inv) == (20, 0.5, 7, 6)


def test_array_state_round_trip_and_validation():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    back = array_from_state(array_state(a))
    assert back.dtype == np.float32 and (back == a).all() and back.flags.writeable
    bad = array_state(a) | {"shape": [5, 4]}
    with pytest.raises(ValueError):
        array_from_state(bad)


def test_invalid_inputs_are_rejected_without_change():
    with pytest.raises(ValueError):
        LinUCB(3, lam=0.0)
    with pytest.raises(ValueError):
        LinUCB(0)
    bandit = LinUCB(3)
    before = bandit.state_dict()
    for x, r in [(np.array([1.0, np.nan, 0.0]), 1.0), (np.ones(3), float("inf")), (np.ones(4), 1.0)]:
        with pytest.raises(ValueError):
            bandit.update(x, r)
    with pytest.raises(ValueError):
        bandit.update_batch(np.ones((2, 3)), np.ones(3))
    assert bandit.state_dict() == before
