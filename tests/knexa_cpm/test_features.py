"""Context builders: layouts, JS divergence, and vectorised UCB scores equal to a per-pair loop."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from knexa_cpm.features import (
    CONTEXT_NAMES,
    ConcatContext,
    InteractionContext,
    js_divergence,
    js_matrix,
    make_context_builder,
    ucb_matrix_loop,
)
from protocol import FAMILY_SLICE, HIST_SLICE, PERF_SLICE, PROFILE_DIM


def profiles(n, rng, alpha=0.3):
    p = np.zeros((n, PROFILE_DIM))
    p[np.arange(n), FAMILY_SLICE.start + rng.integers(0, 4, n)] = 1.0
    p[:, PERF_SLICE] = rng.random((n, 12))
    p[:, HIST_SLICE] = rng.dirichlet(np.full(12, alpha), n)
    return p


def random_model(dim, rng, n_obs=300):
    x = rng.normal(size=(n_obs, dim))
    return rng.normal(size=dim), np.linalg.inv(0.01 * np.eye(dim) + x.T @ x)


def test_js_divergence_bounds_and_symmetry():
    a = np.eye(12)[0]
    b = np.eye(12)[1]
    assert js_divergence(a, a)[()] == pytest.approx(0.0, abs=1e-12)
    assert js_divergence(a, b)[()] == pytest.approx(1.0)  # disjoint supports, base 2
    rng = np.random.default_rng(0)
    p, q = rng.dirichlet(np.ones(12), 20), rng.dirichlet(np.ones(12), 20)
    np.testing.assert_allclose(js_divergence(p, q), js_divergence(q, p), atol=1e-12)
    assert ((js_divergence(p, q) >= 0) & (js_divergence(p, q) <= 1)).all()


def test_js_unnormalised_and_zero_rows():
    p = np.array([[2.0, 2.0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    q = p / 4.0
    assert js_divergence(p, q)[0] == pytest.approx(0.0, abs=1e-12)
    z = np.zeros((1, 12))  # all-zero -> uniform, never NaN
    assert np.isfinite(js_divergence(z, p)).all()


def test_js_matrix_matches_rowwise():
    rng = np.random.default_rng(1)
    h = rng.dirichlet(np.full(12, 0.2), 70)
    m = js_matrix(h, block_rows=16)
    i, j = np.meshgrid(np.arange(70), np.arange(70), indexing="ij")
    np.testing.assert_allclose(m, js_divergence(h[i.ravel()], h[j.ravel()]).reshape(70, 70), atol=1e-12)
    np.testing.assert_allclose(np.diag(m), 0.0, atol=1e-12)


def test_builder_dims_and_layout():
    rng = np.random.default_rng(2)
    p = profiles(5, rng)
    c, x = ConcatContext(), InteractionContext()
    assert (c.dim, x.dim) == (64, 96)
    np.testing.assert_array_equal(c.build(p[:2], p[2:4]), np.concatenate([p[:2], p[2:4]], axis=1))
    ctx = x.build(p[0], p[1])
    assert ctx.shape == (1, 96)
    np.testing.assert_array_equal(ctx[0, :64], np.concatenate([p[0], p[1]]))
    assert ctx[0, -2] == pytest.approx(js_divergence(p[0, HIST_SLICE], p[1, HIST_SLICE])[()])
    same = float(np.argmax(p[0, FAMILY_SLICE]) == np.argmax(p[1, FAMILY_SLICE]))
    assert ctx[0, -1] == same
    # |t_i - t_j| on Pass@1 is the first interaction column
    assert ctx[0, 64] == pytest.approx(abs(p[0, PERF_SLICE.start] - p[1, PERF_SLICE.start]))


def test_builder_rejects_wrong_width():
    with pytest.raises(ValueError):
        ConcatContext().build(np.zeros((2, 31)), np.zeros((2, 31)))
    with pytest.raises(ValueError, match="unknown context"):
        make_context_builder("nope")


@pytest.mark.parametrize("name", CONTEXT_NAMES)
@pytest.mark.parametrize("n", [2, 7, 23])
def test_vectorised_scores_equal_loop(name, n):
    rng = np.random.default_rng(n)
    b = make_context_builder(name)
    if isinstance(b, InteractionContext):
        b.block_pairs = 50  # several row blocks, the last one partial
    theta, a_inv = random_model(b.dim, rng)
    p = profiles(n, rng)
    fast = b.ucb_matrix(p, theta, a_inv, 0.7)
    slow = ucb_matrix_loop(b, p, theta, a_inv, 0.7)
    off = ~np.eye(n, dtype=bool)
    np.testing.assert_allclose(fast[off], slow[off], rtol=1e-10, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 9), beta=st.floats(0, 3))
def test_vectorised_scores_property(seed, n, beta):
    rng = np.random.default_rng(seed)
    for name in CONTEXT_NAMES:
        b = make_context_builder(name)
        theta, a_inv = random_model(b.dim, rng, n_obs=rng.integers(0, 200))
        p = np.round(profiles(n, rng, alpha=0.1), 2)
        fast = b.ucb_matrix(p, theta, a_inv, beta)
        slow = ucb_matrix_loop(b, p, theta, a_inv, beta)
        off = ~np.eye(n, dtype=bool)
        np.testing.assert_allclose(fast[off], slow[off], rtol=1e-9, atol=1e-9)


def test_ucb_with_prior_only_is_pure_exploration():
    # A = lam I, b = 0: theta = 0 and UCB = beta * |x| / sqrt(lam)
    rng = np.random.default_rng(3)
    p = profiles(6, rng)
    b = ConcatContext()
    s = b.ucb_matrix(p, np.zeros(64), np.eye(64) / 0.01, 2.0)
    norms = np.sqrt((p**2).sum(1)[:, None] + (p**2).sum(1)[None, :])
    np.testing.assert_allclose(s, 2.0 * norms / 0.1, rtol=1e-12)


def test_js_cache_follows_histograms():
    rng = np.random.default_rng(4)
    b = InteractionContext()
    p = profiles(6, rng)
    theta, a_inv = random_model(b.dim, rng)
    first = b.ucb_matrix(p, theta, a_inv, 1.0)
    p2 = p.copy()
    p2[:, HIST_SLICE] = p[::-1, HIST_SLICE]
    second = b.ucb_matrix(p2, theta, a_inv, 1.0)
    off = ~np.eye(6, dtype=bool)
    np.testing.assert_allclose(second[off], ucb_matrix_loop(b, p2, theta, a_inv, 1.0)[off], rtol=1e-10)
    assert not np.allclose(first, second)


def test_shape_mismatch_between_builder_and_model():
    with pytest.raises(ValueError, match="dim"):
        ConcatContext().ucb_matrix(np.zeros((3, 32)), np.zeros(96), np.eye(96), 1.0)


@pytest.mark.parametrize("block_pairs", [1, 300, 1 << 12, 1 << 20])
def test_interaction_fast_path_equals_direct(block_pairs):
    # the factorised scorer against the straightforward one (all 32 interaction dims per pair),
    # within 1e-9 of the score scale, after a realistic amount of learning
    rng = np.random.default_rng(block_pairs)
    n = 150
    b = InteractionContext(block_pairs=block_pairs)
    p = np.round(profiles(n, rng, alpha=0.1), 2)
    p[:3, FAMILY_SLICE] = 0.0  # malformed family block: argmax says family 0 in both paths
    te, st = rng.integers(0, n, 3000), rng.integers(0, n, 3000)
    x = b.build(p[te], p[st])
    a = 0.01 * np.eye(b.dim) + x.T @ x
    a_inv = np.linalg.inv(a)
    theta = a_inv @ (x.T @ (x @ rng.normal(size=b.dim) + rng.normal(size=3000)))
    for beta in (0.0, 0.7):
        fast = b.ucb_matrix(p, theta, a_inv, beta)
        direct = b._ucb_matrix_direct(p, theta, a_inv, beta)
        off = ~np.eye(n, dtype=bool)
        np.testing.assert_allclose(fast[off], direct[off], rtol=1e-9, atol=1e-9 * np.abs(direct[off]).max())


def test_one_blas_thread_restores_the_setting():
    from knexa_cpm import features

    if features._SET_BLAS_THREADS is None:
        pytest.skip("numpy has no bundled OpenBLAS here")
    before = features._SET_BLAS_THREADS(3)
    try:
        with features._one_blas_thread():
            assert features._SET_BLAS_THREADS(1) == 1
        assert features._SET_BLAS_THREADS(3) == 3
    finally:
        features._SET_BLAS_THREADS(before)
