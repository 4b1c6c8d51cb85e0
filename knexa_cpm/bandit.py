"""LinUCB (SPEC Alg. 1): A = lambda*I, b = 0, theta = A^-1 b, UCB = theta.x + beta*sqrt(x' A^-1 x).

Why keep A^-1 and not A: every round scores N(N-1) contexts against A^-1, but A changes by one
rank-1 term per reward. Sherman-Morrison updates A^-1 in O(d^2) instead of O(d^3):

    (A + x x')^-1 = A^-1 - (A^-1 x)(A^-1 x)' / (1 + x' A^-1 x)

Rounding errors of repeated rank-1 updates accumulate, so A^-1 is recomputed from A every
`reinvert_every` updates (A itself is always exact up to summation order). `update_batch` applies
k rewards at once with the Woodbury identity (one k x k solve), for simulations and backfills.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .features import _one_blas_thread

__all__ = ["LinUCB", "array_from_state", "array_state"]


def array_state(a: np.ndarray) -> dict[str, Any]:
    """A numpy array as a msgpack-safe dict {"dtype", "shape", "data"} (exact bytes)."""
    a = np.ascontiguousarray(a)
    return {"dtype": str(a.dtype), "shape": list(a.shape), "data": a.tobytes()}


def array_from_state(d: dict[str, Any]) -> np.ndarray:
    """Inverse of `array_state`; returns a writable copy."""
    dtype = np.dtype(d["dtype"])
    shape = tuple(int(s) for s in d["shape"])
    data = bytes(d["data"])
    if len(data) != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
        raise ValueError(f"array state: {len(data)} bytes do not fit shape {shape} of {dtype}")
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()


class LinUCB:
    """Ridge-regression bandit over d-dim contexts with an upper-confidence exploration bonus.

    Args:
        dim: context dimension d.
        lam: ridge prior, A = lam * I (SPEC: 0.01 in the repo README, 1 in Alg. 1).
        reinvert_every: recompute A^-1 = inv(A) after this many updates (0 = never).

    Raises:
        ValueError: dim < 1, lam <= 0 or reinvert_every < 0.
    """

    def __init__(self, dim: int, lam: float = 0.01, reinvert_every: int = 256) -> None:
        if dim < 1:
            raise ValueError("dim must be >= 1")
        if not lam > 0:
            raise ValueError("lam must be > 0 (A = lam * I must be invertible)")
        if reinvert_every < 0:
            raise ValueError("reinvert_every must be >= 0")
        self.dim = int(dim)
        self.lam = float(lam)
        self.reinvert_every = int(reinvert_every)
        self.A = self.lam * np.eye(self.dim)
        self.A_inv = np.eye(self.dim) / self.lam
        self.b = np.zeros(self.dim)
        self.n_updates = 0
        self._since_inv = 0

    @property
    def theta(self) -> np.ndarray:
        """Ridge estimate theta = A^-1 b."""
        return self.A_inv @ self.b

    def ucb(self, X: np.ndarray, beta: float, block_rows: int = 1 << 14) -> np.ndarray:
        """UCB of every row of X (M, d), in row blocks so the temporary stays small."""
        X = np.atleast_2d(np.asarray(X, dtype=np.float64))
        if X.shape[1] != self.dim:
            raise ValueError(f"contexts must have {self.dim} columns, got {X.shape}")
        theta = self.theta
        out = np.empty(X.shape[0])
        for r0 in range(0, X.shape[0], block_rows):
            xb = X[r0:r0 + block_rows]
            width = np.einsum("ij,ij->i", xb @ self.A_inv, xb)
            out[r0:r0 + block_rows] = xb @ theta + beta * np.sqrt(np.maximum(width, 0.0))
        return out

    def _check(self, X: np.ndarray, r: np.ndarray) -> None:
        if X.shape[1] != self.dim or X.shape[0] != r.shape[0]:
            raise ValueError(f"expected ({r.shape[0]}, {self.dim}) contexts, got {X.shape}")
        if not (np.isfinite(X).all() and np.isfinite(r).all()):
            raise ValueError("contexts and rewards must be finite")

    def update(self, x: np.ndarray, reward: float) -> None:
        """A += x x', b += r x, and A^-1 by Sherman-Morrison (SPEC Alg. 1 step 4).

        Raises:
            ValueError: wrong shape or non-finite values (nothing is changed).
        """
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        r = float(reward)
        if x.shape[0] != self.dim:
            raise ValueError(f"context must have {self.dim} entries, got {x.shape[0]}")
        if not (math.isfinite(r) and math.isfinite(float(x @ x))):
            raise ValueError("context and reward must be finite")
        xx = np.outer(x, x)
        self.A += xx
        self.b += r * x
        ax = self.A_inv @ x
        np.outer(ax, ax, out=xx)
        xx /= 1.0 + x @ ax
        self.A_inv -= xx
        self._count(1)

    def update_batch(self, X: np.ndarray, rewards: np.ndarray) -> None:
        """Apply k updates at once; equal (to rounding) to k calls of `update` in any order.

        Woodbury: (A + X'X)^-1 = A^-1 - A^-1 X' (I_k + X A^-1 X')^-1 X A^-1, one k x k solve.
        When k >= d a fresh inverse of the updated A is cheaper and is used instead.

        Raises:
            ValueError: wrong shapes or non-finite values (nothing is changed).
        """
        X = np.atleast_2d(np.asarray(X, dtype=np.float64))
        r = np.asarray(rewards, dtype=np.float64).reshape(-1)
        self._check(X, r)
        k = X.shape[0]
        if k == 0:
            return
        with _one_blas_thread():  # small products: threads only add spin-waits (features.py)
            self.A += X.T @ X
            self.b += X.T @ r
            if k >= self.dim:
                self.A_inv = _sym_inv(self.A)
                self._since_inv = 0
                self.n_updates += k
                return
            ax = X @ self.A_inv  # (k, d); rows are (A^-1 x)' since A^-1 is symmetric
            inner = np.eye(k) + ax @ X.T
            self.A_inv -= ax.T @ np.linalg.solve(inner, ax)
            self.A_inv = 0.5 * (self.A_inv + self.A_inv.T)
        self._count(k)

    def _count(self, k: int) -> None:
        self.n_updates += k
        self._since_inv += k
        if self.reinvert_every and self._since_inv >= self.reinvert_every:
            self.reinvert()

    def reinvert(self) -> None:
        """Recompute A^-1 from A, discarding the drift of the incremental updates."""
        self.A_inv = _sym_inv(self.A)
        self._since_inv = 0

    def drift(self) -> float:
        """max |A^-1 A - I|: how far the kept inverse has strayed (0 for an exact inverse)."""
        return float(np.abs(self.A_inv @ self.A - np.eye(self.dim)).max())

    def state_dict(self) -> dict[str, Any]:
        """Msgpack-safe snapshot; `load_state_dict` restores it bit for bit."""
        return {
            "dim": self.dim, "lam": self.lam, "reinvert_every": self.reinvert_every,
            "A": array_state(self.A), "A_inv": array_state(self.A_inv), "b": array_state(self.b),
            "n_updates": self.n_updates, "since_inv": self._since_inv,
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore a `state_dict` snapshot.

        Raises:
            ValueError: the snapshot's arrays do not match its dim, or are not finite.
        """
        dim = int(d["dim"])
        a, a_inv, b = (array_from_state(d[k]).astype(np.float64) for k in ("A", "A_inv", "b"))
        if a.shape != (dim, dim) or a_inv.shape != (dim, dim) or b.shape != (dim,):
            raise ValueError("bandit state arrays do not match its dim")
        if not (np.isfinite(a).all() and np.isfinite(a_inv).all() and np.isfinite(b).all()):
            raise ValueError("bandit state holds non-finite values")
        self.dim, self.lam, self.reinvert_every = dim, float(d["lam"]), int(d["reinvert_every"])
        self.A, self.A_inv, self.b = a, a_inv, b
        self.n_updates = int(d["n_updates"])
        self._since_inv = int(d.get("since_inv", 0))

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> LinUCB:
        bandit = cls(int(d["dim"]), float(d["lam"]), int(d["reinvert_every"]))
        bandit.load_state_dict(d)
        return bandit


def _sym_inv(a: np.ndarray) -> np.ndarray:
    inv = np.linalg.inv(a)
    return 0.5 * (inv + inv.T)
