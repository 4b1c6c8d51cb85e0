"""Running reward normalisation (SPEC Eq. 3 note): r_norm = (r - mu) / (sigma + 1e-6).

Why normalise: raw Eq. 3 rewards are a loss drop minus a kilobyte penalty, in units that depend
on the model, the data and gamma/delta. LinUCB's exploration bonus beta * sqrt(x'A^-1 x) is in
reward units, so one beta only fits every federation if rewards are on a unit scale.

Why Welford: the CPM sees rewards one at a time over days and must persist its statistics; the
textbook sum/sum-of-squares formula loses precision when the mean is large relative to the
spread, Welford's recurrence does not, and its state is three numbers.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["EPS", "RunningNorm"]

#: the SPEC's guard against division by zero (first reward, or all rewards equal)
EPS = 1e-6


class RunningNorm:
    """Welford's online mean / population variance, and z-normalisation against them.

    `normalise(x)` uses statistics that *include* x (call `update(x)` first, as `push` does): the
    first reward then maps to 0 instead of (x - 0) / 1e-6, which would swamp the bandit.
    """

    def __init__(self, count: int = 0, mean: float = 0.0, m2: float = 0.0) -> None:
        if count < 0 or m2 < 0 or not (math.isfinite(mean) and math.isfinite(m2)):
            raise ValueError("invalid running statistics")
        self.count, self.mean, self.m2 = int(count), float(mean), float(m2)

    def update(self, x: float) -> None:
        """Add one observation. Raises ValueError if x is not finite (nothing changes)."""
        x = float(x)
        if not math.isfinite(x):
            raise ValueError(f"reward must be finite, got {x!r}")
        self.count += 1
        delta = x - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (x - self.mean)

    @property
    def var(self) -> float:
        """Population variance (numpy's default ddof=0); 0 before two observations."""
        return self.m2 / self.count if self.count > 1 else 0.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def normalise(self, x: float) -> float:
        """(x - mu) / (sigma + 1e-6) against the current statistics."""
        return (float(x) - self.mean) / (self.std + EPS)

    def push(self, x: float) -> float:
        """`update(x)` then `normalise(x)`: what the bandit learns from."""
        self.update(x)
        return self.normalise(x)

    def push_many(self, xs: np.ndarray) -> np.ndarray:
        """`push` of each value in order, returning the normalised values (a Python loop: the
        recurrence is sequential, and k is a handful of rewards per round)."""
        xs = np.asarray(xs, dtype=np.float64).reshape(-1)
        if not np.isfinite(xs).all():
            raise ValueError("rewards must be finite")
        return np.array([self.push(float(x)) for x in xs])

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> RunningNorm:
        return cls(int(d["count"]), float(d["mean"]), float(d["m2"]))

    def __repr__(self) -> str:
        return f"RunningNorm(count={self.count}, mean={self.mean:.6g}, std={self.std:.6g})"
