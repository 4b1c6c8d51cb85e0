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
- interaction: x = [s, w] with s = [p_i, p_j] handled as above, and the 50 non-separable dims w
  built one block of teacher rows at a time: x'Mx = s'Mss s + 2 (g_i + h_j).w + w'Mww w with
  g = P Msw[:32], h = P Msw[32:]. Memory is bounded by `2 * block_pairs * 32` floats; the cost is
  O(N^2 d_w^2), which is why d_w is kept small.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

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
        mean, quad = _concat_parts(self._rows(profiles), theta, a_inv)
        return _combine(mean, quad, beta)


class InteractionContext(ContextBuilder):
    """[p_i, p_j, |t_i - t_j|, t_i * t_j, JS(h_i, h_j), same_family] (96 dims)."""

    name = "interaction"
    n_t = len(_T)
    n_w = 2 * n_t + 2
    dim = 2 * PROFILE_DIM + n_w

    def __init__(self, block_pairs: int = 1 << 13) -> None:
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
