"""Pair contexts x_ij for ordered (teacher i, student j) pairs, and their UCB scores for all pairs.

Two builders, chosen by name (`make_context_builder`):

- ``concat``: the paper's x = [p_i, p_j] (2 * 32 = 64 dims, SPEC "Context"). Under a *linear*
  reward model it is additive, theta.x = f(p_i) + g(p_j): it can learn "good teacher" and "needy
  student" but not *compatibility between* i and j (SPEC "Our decisions").
- ``interaction``: [p_i, p_j] followed by |t_i - t_j| and t_i * t_j where t is the current
  performance (Pass@1, CodeBLEU, scaled log-perplexity: PERF dims 0-2) and the 12-bin histogram,
  15 dims each, then the Jensen-Shannon divergence of the two histograms and a same-family flag:
  64 + 32 = 96 dims. The other 9 performance dims (deltas, EMAs, bests) keep their main effects
  in [p_i, p_j] but get no interaction terms: they mostly restate dims 0-2, and every interaction
  dim costs N^2 * d_w multiply-adds per round. No bias column: the family one-hots of p_i
  already sum to 1, so a bias would only add an exactly collinear direction.

Scoring every ordered pair (SPEC Alg. 1 step 2) never materialises the N^2 x d context matrix:

- concat: with M = A^-1 split into 32 x 32 blocks, x'Mx = p_i'M11 p_i + p_j'M22 p_j + 2 p_i'M12 p_j,
  i.e. two per-node terms and one N x N matrix product, so scores cost O(N^2 + N d^2).
- interaction: x = [f, u] with f = [p_i, p_j, t_i * t_j] (79 dims, each term a product of a
  teacher vector and a student vector) and u = [|t_i - t_j|, JS, same] (17 dims that do not
  factor). theta_f.f and f'Mff f are two N x N matrix products (the t_i * t_j block through the
  120 distinct entries of t t'); theta_u.u + u'Muu u + 2 u.(Muf f) is built one block of
  teacher rows at a time, ~550 multiply-adds per pair. Memory is bounded by
  `3 * 17 * block_pairs` floats; the cost is O(N^2 d_u^2), which is why d_u is kept small.
  `InteractionContext._ucb_matrix_direct` (all 32 interaction dims per pair) is the reference.

Scoring runs its matrix products on one BLAS thread (`_one_blas_thread`): they are thin, and
OpenBLAS's spinning threads made them several times slower on a busy 2-core machine.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np

from protocol import FAMILY_SLICE, HIST_SLICE, PERF_SLICE, PROFILE_DIM

__all__ = [
    "CONTEXT_NAMES",
    "ConcatContext",
    "ContextBuilder",
    "InteractionContext",
    "js_divergence",
    "js_matrix",
    "make_context_builder",
    "ucb_matrix_loop",
]

_TINY = 1e-300
#: dims that get interaction terms: current Pass@1, CodeBLEU, log-perplexity + the histogram
_T = np.r_[np.arange(PERF_SLICE.start, PERF_SLICE.start + 3), np.arange(HIST_SLICE.start, HIST_SLICE.stop)]
#: interaction layout after [p_i, p_j]: |t_i - t_j| at 64.., t_i * t_j at _M0.., then JS, same
_M0 = 2 * PROFILE_DIM + len(_T)
#: the non-factorable dims of the interaction context: |t_i - t_j|, JS, same-family
_U = np.r_[np.arange(2 * PROFILE_DIM, _M0), _M0 + len(_T), _M0 + len(_T) + 1]
_IU, _JU = np.triu_indices(len(_T))
#: up to this many agents the interaction scores are computed directly (measured crossover ~20)
_DIRECT_MAX_N = 16


def _openblas_local_threads() -> Callable[[int], int] | None:
    """numpy's bundled OpenBLAS `openblas_set_num_threads_local` (returns the old count), if any."""
    try:
        import ctypes
        from pathlib import Path

        libs = Path(np.__file__).parent.parent / "numpy.libs"
        for path in sorted(libs.glob("libscipy_openblas*.so*")) + sorted(libs.glob("libopenblas*.so*")):
            fn = getattr(ctypes.CDLL(str(path)), "openblas_set_num_threads_local", None)
            if fn is not None:
                fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_int]
                return fn  # type: ignore[no-any-return]
    except OSError:
        pass
    return None


_SET_BLAS_THREADS = _openblas_local_threads()


@contextmanager
def _one_blas_thread() -> Iterator[None]:
    """Run the block's BLAS calls on one thread, then restore the caller's setting.

    Why: scoring is made of thin products (inner dims 15-184); OpenBLAS's threads gain nothing
    on them and, on a machine whose cores are busy, their spin-waits made the same products
    2-10x slower in `benchmarks/bench_matching.py`. A no-op where numpy has no OpenBLAS.
    """
    if _SET_BLAS_THREADS is None:
        yield
        return
    old = _SET_BLAS_THREADS(1)
    try:
        yield
    finally:
        _SET_BLAS_THREADS(max(int(old), 1))


def _normalise_rows(h: np.ndarray) -> np.ndarray:
    """Clip negatives and scale rows to sum 1 (an all-zero row becomes uniform)."""
    h = np.clip(np.asarray(h, dtype=np.float64), 0.0, None)
    s = h.sum(axis=-1, keepdims=True)
    uniform = np.full_like(h, 1.0 / h.shape[-1])
    return np.where(s > 0, h / np.where(s > 0, s, 1.0), uniform)


def _plogp(p: np.ndarray) -> np.ndarray:
    """p * log2(p) with 0 log 0 = 0."""
    return p * np.log2(np.maximum(p, _TINY))


def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Row-wise Jensen-Shannon divergence (base 2, so in [0, 1]) of histogram rows.

    JS(p, q) = H((p + q) / 2) - (H(p) + H(q)) / 2 with H the Shannon entropy in bits; the same
    formula as `js_matrix`, so both agree to rounding.
    """
    p, q = _normalise_rows(p), _normalise_rows(q)
    hm = -_plogp(0.5 * (p + q)).sum(axis=-1)
    hp, hq = -_plogp(p).sum(axis=-1), -_plogp(q).sum(axis=-1)
    return np.clip(hm - 0.5 * (hp + hq), 0.0, 1.0)


def js_matrix(hist: np.ndarray, block_rows: int = 64) -> np.ndarray:
    """(N, N) Jensen-Shannon divergences of all histogram rows, computed in row blocks.

    Per-node entropies are computed once; only H of the mixtures is per pair.
    """
    h = _normalise_rows(hist)
    n = h.shape[0]
    ent = -_plogp(h).sum(axis=1)
    out = np.empty((n, n))
    for r0 in range(0, n, block_rows):
        r1 = min(n, r0 + block_rows)
        m = 0.5 * (h[r0:r1, None, :] + h[None, :, :])
        out[r0:r1] = -_plogp(m).sum(axis=-1) - 0.5 * (ent[r0:r1, None] + ent[None, :])
    return np.clip(out, 0.0, 1.0)


def _family(profiles: np.ndarray) -> np.ndarray:
    return np.argmax(profiles[..., FAMILY_SLICE], axis=-1)


class ContextBuilder(ABC):
    """Maps ordered (teacher, student) profile pairs to contexts, and scores all pairs at once."""

    name: str = ""
    dim: int = 0

    @abstractmethod
    def build(self, teacher: np.ndarray, student: np.ndarray) -> np.ndarray:
        """Contexts (M, dim) for M teacher rows and M student rows of shape (M, 32) or (32,)."""

    @abstractmethod
    def ucb_matrix(self, profiles: np.ndarray, theta: np.ndarray, a_inv: np.ndarray,
                   beta: float) -> np.ndarray:
        """(N, N) UCB theta.x_ij + beta * sqrt(x_ij' A^-1 x_ij) for teacher i, student j.

        The diagonal is computed like any other entry; callers mask it out.
        """

    @staticmethod
    def _rows(a: np.ndarray) -> np.ndarray:
        a = np.atleast_2d(np.asarray(a, dtype=np.float64))
        if a.shape[-1] != PROFILE_DIM:
            raise ValueError(f"profiles must have {PROFILE_DIM} columns, got shape {a.shape}")
        return a

    def _check(self, theta: np.ndarray, a_inv: np.ndarray) -> None:
        if theta.shape != (self.dim,) or a_inv.shape != (self.dim, self.dim):
            raise ValueError(f"{self.name} context has dim {self.dim}; got theta {theta.shape}, "
                             f"A^-1 {a_inv.shape}")


def _concat_parts(profiles: np.ndarray, theta: np.ndarray, a_inv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean theta_s.s and quadratic form s'Mss s of s = [p_i, p_j] for all (i, j), O(N^2)."""
    d = PROFILE_DIM
    p = profiles
    m11, m12, m22 = a_inv[:d, :d], a_inv[:d, d:2 * d], a_inv[d:2 * d, d:2 * d]
    mean = (p @ theta[:d])[:, None] + (p @ theta[d:2 * d])[None, :]
    q_t = np.einsum("ik,kl,il->i", p, m11, p)
    q_s = np.einsum("ik,kl,il->i", p, m22, p)
    quad = (p @ m12) @ p.T
    quad *= 2.0
    quad += q_t[:, None]
    quad += q_s[None, :]
    return mean, quad


def _combine(mean: np.ndarray, quad: np.ndarray, beta: float) -> np.ndarray:
    # A^-1 is positive definite, so x'A^-1 x >= 0; clip the tiny negatives that rounding can give
    np.maximum(quad, 0.0, out=quad)
    np.sqrt(quad, out=quad)
    quad *= beta
    quad += mean
    return quad


class ConcatContext(ContextBuilder):
    """The paper's x = [p_teacher, p_student] (64 dims)."""

    name = "concat"
    dim = 2 * PROFILE_DIM

    def build(self, teacher: np.ndarray, student: np.ndarray) -> np.ndarray:
        t, s = self._rows(teacher), self._rows(student)
        return np.concatenate([t, s], axis=1)

    def ucb_matrix(self, profiles: np.ndarray, theta: np.ndarray, a_inv: np.ndarray,
                   beta: float) -> np.ndarray:
        self._check(theta, a_inv)
        with _one_blas_thread():
            mean, quad = _concat_parts(self._rows(profiles), theta, a_inv)
        return _combine(mean, quad, beta)


class InteractionContext(ContextBuilder):
    """[p_i, p_j, |t_i - t_j|, t_i * t_j, JS(h_i, h_j), same_family] (96 dims)."""

    name = "interaction"
    n_t = len(_T)
    n_w = 2 * n_t + 2
    dim = 2 * PROFILE_DIM + n_w

    def __init__(self, block_pairs: int = 1 << 12) -> None:
        self.block_pairs = int(block_pairs)
        # the data histogram of a node rarely changes between rounds, so the N x N JS matrix is
        # memoised on the exact histogram block (a cache, not state: never persisted)
        self._js_key: np.ndarray | None = None
        self._js: np.ndarray | None = None

    def build(self, teacher: np.ndarray, student: np.ndarray) -> np.ndarray:
        t, s = self._rows(teacher), self._rows(student)
        tt, ts = t[:, _T], s[:, _T]
        js = js_divergence(t[:, HIST_SLICE], s[:, HIST_SLICE])[:, None]
        same = (_family(t) == _family(s)).astype(np.float64)[:, None]
        return np.concatenate([t, s, np.abs(tt - ts), tt * ts, js, same], axis=1)

    def js_all(self, profiles: np.ndarray) -> np.ndarray:
        hist = profiles[:, HIST_SLICE]
        if self._js_key is None or self._js_key.shape != hist.shape or not np.array_equal(self._js_key, hist):
            self._js_key, self._js = hist.copy(), js_matrix(hist)
        assert self._js is not None
        return self._js

    def ucb_matrix(self, profiles: np.ndarray, theta: np.ndarray, a_inv: np.ndarray,
                   beta: float) -> np.ndarray:
        """All-pairs UCB, splitting x_ij into factorable and non-factorable dims.

        Why: building all 32 interaction dims per pair and multiplying by the 32 x 32 block of
        A^-1 costs ~1,100 multiply-adds per pair. But only u = [|t_i - t_j|, JS, same] (17 dims)
        is non-factorable; f = [p_i, p_j, t_i * t_j] is a product of per-node vectors, so every
        f'Mf and theta_f.f term is one N x N matrix product (t_i*t_j against itself uses the 120
        distinct entries of t t'). Per pair that leaves u'Muu u + 2 u.(Muf f), ~550 multiply-adds
        in row blocks of `block_pairs` pairs. Equal to `_ucb_matrix_direct` up to rounding.
        """
        self._check(theta, a_inv)
        p = self._rows(profiles)
        with _one_blas_thread():
            if p.shape[0] <= _DIRECT_MAX_N:  # a handful of agents: setup would cost more than it saves
                return self._ucb_matrix_direct(p, theta, a_inv, beta)
            mean, quad = self._factorable(p, theta, a_inv)
            self._add_nonfactorable(p, theta, a_inv, mean, quad)
        return _combine(mean, quad, beta)

    def _factorable(self, p: np.ndarray, theta: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """theta_f.f and f'M_ff f for f = [p_i, p_j, t_i * t_j]: two matrix products, O(N^2 d)."""
        d, a0, nt = PROFILE_DIM, _M0, self.n_t
        n = p.shape[0]
        t = p[:, _T]
        ones = np.ones((n, 1))
        q_t = np.einsum("ik,kl,il->i", p, m[:d, :d], p)[:, None]
        q_s = np.einsum("ik,kl,il->i", p, m[d:2 * d, d:2 * d], p)[:, None]
        m_pm = m[a0:a0 + nt, a0:a0 + nt]
        qq = t[:, _IU] * t[:, _JU]  # (N, 120): t t' above the diagonal
        weight = np.where(_IU == _JU, 1.0, 2.0) * m_pm[_IU, _JU]
        left = np.concatenate([p @ (2.0 * m[:d, d:2 * d]), 2.0 * (p @ m[:d, a0:a0 + nt]) * t, t,
                               qq * weight, q_t, ones], axis=1)
        right = np.concatenate([p, t, 2.0 * (p @ m[d:2 * d, a0:a0 + nt]) * t, qq, ones, q_s], axis=1)
        quad = left @ right.T
        mean = np.concatenate([(p @ theta[:d])[:, None], ones, t * theta[a0:a0 + nt]], axis=1) @ \
            np.concatenate([ones, (p @ theta[d:2 * d])[:, None], t], axis=1).T
        return mean, quad

    def _add_nonfactorable(self, p: np.ndarray, theta: np.ndarray, m: np.ndarray,
                           mean: np.ndarray, quad: np.ndarray) -> None:
        """Add theta_u.u and u'Muu u + 2 u.(Muf f) for u = [|t_i - t_j|, JS, same], in row blocks."""
        d, a0, nt = PROFILE_DIM, _M0, self.n_t
        n, nu = p.shape[0], _U.size
        t = p[:, _T]
        tt = np.ascontiguousarray(t.T)
        fam = np.zeros((n, FAMILY_SLICE.stop - FAMILY_SLICE.start))
        fam[np.arange(n), _family(p)] = 1.0
        same = fam @ fam.T  # exactly 1.0 / 0.0
        js = self.js_all(p)
        m_uu = np.ascontiguousarray(m[np.ix_(_U, _U)])
        m_um = 2.0 * m[a0:a0 + nt][:, _U].T  # (17, 15): u's cross terms with t_i * t_j
        g = 2.0 * (p @ m[:d, _U])  # (N, 17): with p_teacher
        h = np.ascontiguousarray((2.0 * (p @ m[d:2 * d, _U])).T)  # (17, N): with p_student
        theta_u = theta[_U]
        rows = max(1, self.block_pairs // max(n, 1))
        u_buf, y_buf, c_buf = np.empty((rows, nu, n)), np.empty((rows, nu, n)), np.empty((rows * nu, n))
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            b = r1 - r0
            u = u_buf[:b]
            np.subtract(t[r0:r1, :, None], tt[None, :, :], out=u[:, :nt])
            np.abs(u[:, :nt], out=u[:, :nt])
            u[:, nt] = js[r0:r1]
            u[:, nt + 1] = same[r0:r1]
            y = np.matmul(m_uu, u, out=y_buf[:b])
            c = np.matmul((t[r0:r1, None, :] * m_um[None, :, :]).reshape(b * nu, nt), tt,
                          out=c_buf[:b * nu]).reshape(b, nu, n)
            c += g[r0:r1, :, None]
            c += h[None, :, :]
            y += c
            y *= u
            quad[r0:r1] += y.sum(axis=1)
            mean[r0:r1] += np.matmul(theta_u, u)

    def _ucb_matrix_direct(self, profiles: np.ndarray, theta: np.ndarray, a_inv: np.ndarray,
                           beta: float) -> np.ndarray:
        """The straightforward blocked version (all 32 interaction dims per pair): the reference
        the faster `ucb_matrix` is tested against."""
        self._check(theta, a_inv)
        p = self._rows(profiles)
        n, d2, nt = p.shape[0], 2 * PROFILE_DIM, self.n_t
        mean, quad = _concat_parts(p, theta, a_inv)
        g = 2.0 * (p @ a_inv[:PROFILE_DIM, d2:])  # (N, d_w): teacher side of 2 s'Msw w
        h = 2.0 * (p @ a_inv[PROFILE_DIM:d2, d2:])  # (N, d_w): student side
        mww, theta_w = a_inv[d2:, d2:], theta[d2:]
        t = p[:, _T]
        js = self.js_all(p)
        fam = _family(p)
        rows = max(1, self.block_pairs // max(n, 1))
        w = np.empty((rows, n, self.n_w))
        y = np.empty((rows * n, self.n_w))
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            b = r1 - r0
            wb = w[:b]
            np.subtract(t[r0:r1, None, :], t[None, :, :], out=wb[..., :nt])
            np.abs(wb[..., :nt], out=wb[..., :nt])
            np.multiply(t[r0:r1, None, :], t[None, :, :], out=wb[..., nt:2 * nt])
            wb[..., 2 * nt] = js[r0:r1]
            wb[..., 2 * nt + 1] = fam[r0:r1, None] == fam[None, :]
            w2 = wb.reshape(b * n, self.n_w)
            mean[r0:r1] += (w2 @ theta_w).reshape(b, n)
            yb = np.matmul(w2, mww, out=y[: b * n]).reshape(b, n, self.n_w)
            yb += g[r0:r1, None, :]
            yb += h[None, :, :]
            quad[r0:r1] += np.einsum("bnk,bnk->bn", wb, yb)
        return _combine(mean, quad, beta)


CONTEXT_NAMES: tuple[str, ...] = ("concat", "interaction")


def make_context_builder(name: str) -> ContextBuilder:
    """The context builder called `name` (one of `CONTEXT_NAMES`).

    Raises:
        ValueError: unknown name.
    """
    if name == "concat":
        return ConcatContext()
    if name == "interaction":
        return InteractionContext()
    raise ValueError(f"unknown context builder {name!r}; choose from {CONTEXT_NAMES}")


def ucb_matrix_loop(builder: ContextBuilder, profiles: np.ndarray, theta: np.ndarray,
                    a_inv: np.ndarray, beta: float) -> np.ndarray:
    """Reference: the same (N, N) UCB matrix, one ordered pair at a time in a Python loop.

    Only for tests and as the benchmark's naive baseline; the diagonal is left at -inf.
    """
    p = np.asarray(profiles, dtype=np.float64)
    n = p.shape[0]
    out = np.full((n, n), -np.inf)
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            x = builder.build(p[i], p[j])[0]
            out[i, j] = float(theta @ x) + beta * float(np.sqrt(max(float(x @ a_inv @ x), 0.0)))
    return out
