"""Running reward normalisation (SPEC Eq. 3 note): r_norm = (r - mu) / (sigma + 1e-6), Welford."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["RunningNorm"]


@dataclass
class RunningNorm:
    """Welford's online mean/variance: numerically stable, O(1) per reward, persistable."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def update(self, x: float) -> None:
        self.count += 1
        delta = x - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (x - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count > 1 else 0.0

    def normalise(self, x: float) -> float:
        """Normalise against the statistics *including* x (the first reward maps to 0)."""
        return (x - self.mean) / (self.std + 1e-6)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    @classmethod
    def from_state(cls, d: dict) -> RunningNorm:
        return cls(int(d["count"]), float(d["mean"]), float(d["m2"]))
