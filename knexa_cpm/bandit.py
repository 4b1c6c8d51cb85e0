"""LinUCB (SPEC Alg. 1): A = lambda*I, b = 0, theta = A^-1 b, UCB = theta.x + beta*sqrt(x' A^-1 x).

A^-1 is kept current with Sherman-Morrison rank-1 updates (O(d^2) instead of O(d^3)) and
re-inverted from A every `reinvert_every` updates to bound floating-point drift.
"""

from __future__ import annotations

import numpy as np

__all__ = ["LinUCB", "array_from_state", "array_state"]


def array_state(a: np.ndarray) -> dict:
    a = np.ascontiguousarray(a)
    return {"dtype": str(a.dtype), "shape": list(a.shape), "data": a.tobytes()}


def array_from_state(d: dict) -> np.ndarray:
    return np.frombuffer(d["data"], dtype=np.dtype(d["dtype"])).reshape(d["shape"]).copy()


class LinUCB:
    def __init__(self, dim: int, lam: float = 0.01, reinvert_every: int = 256) -> None:
        if lam <= 0:
            raise ValueError("lam must be > 0 (A = lam * I must be invertible)")
        self.dim = dim
        self.lam = lam
        self.reinvert_every = reinvert_every
        self.A = lam * np.eye(dim)
        self.A_inv = np.eye(dim) / lam
        self.b = np.zeros(dim)
        self.n_updates = 0

    @property
    def theta(self) -> np.ndarray:
        return self.A_inv @ self.b

    def scores(self, X: np.ndarray, beta: float) -> np.ndarray:
        """UCB of every row of X (M, dim) in one pass."""
        theta = self.theta
        width = np.einsum("ij,jk,ik->i", X, self.A_inv, X, optimize=True)
        return X @ theta + beta * np.sqrt(np.maximum(width, 0.0))

    def update(self, x: np.ndarray, reward: float) -> None:
        x = np.asarray(x, dtype=np.float64)
        self.A += np.outer(x, x)
        self.b += reward * x
        Ax = self.A_inv @ x
        self.A_inv -= np.outer(Ax, Ax) / (1.0 + x @ Ax)
        self.n_updates += 1
        if self.n_updates % self.reinvert_every == 0:
            self.A_inv = np.linalg.inv(self.A)

    def update_batch(self, X: np.ndarray, rewards: np.ndarray) -> None:
        """Many updates at once (Woodbury-equivalent: just re-invert once), for simulations."""
        X = np.asarray(X, dtype=np.float64)
        self.A += X.T @ X
        self.b += X.T @ np.asarray(rewards, dtype=np.float64)
        self.A_inv = np.linalg.inv(self.A)
        self.n_updates += len(X)

    def state_dict(self) -> dict:
        return {"dim": self.dim, "lam": self.lam, "reinvert_every": self.reinvert_every,
                "A": array_state(self.A), "A_inv": array_state(self.A_inv), "b": array_state(self.b),
                "n_updates": self.n_updates}

    def load_state_dict(self, d: dict) -> None:
        self.dim, self.lam, self.reinvert_every = int(d["dim"]), float(d["lam"]), int(d["reinvert_every"])
        self.A, self.A_inv, self.b = (array_from_state(d[k]) for k in ("A", "A_inv", "b"))
        self.n_updates = int(d["n_updates"])
