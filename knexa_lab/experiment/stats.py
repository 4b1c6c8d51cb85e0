"""Confidence intervals over seeds: the only statistics the experiment report uses.

Seeds are the unit of replication (each has its own split, client seeds and method randomness),
so every interval is over per-seed values with Student's t on n - 1 degrees of freedom; with
n = 1 there is no interval, and the report says "n=1" instead of inventing one. Comparisons
between methods are *paired* by seed: both methods ran on the same split, so the per-seed
difference removes the split-to-split variance that would otherwise swamp a small effect.

Pure functions over plain numbers: None and NaN mean "not measured" and are dropped.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats as _st

__all__ = ["MeanCI", "PairedDifference", "finite", "mean_ci", "paired_difference", "t_critical"]

CONFIDENCE = 0.95


def finite(values: Iterable[float | None]) -> list[float]:
    """The measured values: None and non-finite floats dropped."""
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def t_critical(n: int, confidence: float = CONFIDENCE) -> float:
    """Two-sided Student's t critical value for a mean of ``n`` values (n - 1 d.o.f.).

    Raises:
        ValueError: ``n < 2`` (one value has no spread to estimate) or a confidence outside (0, 1).
    """
    if n < 2:
        raise ValueError(f"a t interval needs n >= 2 values, got {n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return float(_st.t.ppf((1 + confidence) / 2, n - 1))


@dataclass(frozen=True, slots=True)
class MeanCI:
    """Mean of ``n`` values with its two-sided t interval; ``half_width`` is None when n < 2."""

    mean: float | None
    half_width: float | None
    n: int
    confidence: float = CONFIDENCE

    @property
    def low(self) -> float | None:
        return None if self.mean is None or self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.mean is None or self.half_width is None else self.mean + self.half_width

    @property
    def excludes_zero(self) -> bool | None:
        """Whether the interval lies strictly on one side of 0 (None without an interval)."""
        if self.low is None or self.high is None:
            return None
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict[str, float | int | bool | None]:
        return {"mean": self.mean, "half_width": self.half_width, "low": self.low, "high": self.high,
                "n": self.n, "confidence": self.confidence}


def mean_ci(values: Iterable[float | None], confidence: float = CONFIDENCE) -> MeanCI:
    """Mean and t-interval half-width ``t * s / sqrt(n)`` (s: sample std, ddof=1) of the
    measured values; ``MeanCI(None, None, 0)`` when there are none."""
    xs = np.asarray(finite(values), dtype=float)
    n = int(xs.size)
    if n == 0:
        return MeanCI(None, None, 0, confidence)
    mean = float(xs.mean())
    if n < 2:
        return MeanCI(mean, None, n, confidence)
    half = t_critical(n, confidence) * float(xs.std(ddof=1)) / math.sqrt(n)
    return MeanCI(mean, half, n, confidence)


@dataclass(frozen=True, slots=True)
class PairedDifference:
    """``a - b`` paired by seed: the seeds both measured, each difference, and their mean CI."""

    seeds: tuple[Hashable, ...]
    differences: tuple[float, ...]
    ci: MeanCI


def paired_difference(a: Mapping[Hashable, float | None], b: Mapping[Hashable, float | None],
                      confidence: float = CONFIDENCE) -> PairedDifference:
    """Per-seed ``a[s] - b[s]`` over the seeds measured in both, and the t interval of their mean.

    A seed missing (or None/NaN) on either side is left out rather than imputed: an unpaired
    value would bring back the between-split variance the pairing removes.
    """
    fa, fb = ({k: v for k, v in m.items() if finite([v])} for m in (a, b))
    seeds = tuple(sorted((k for k in fa if k in fb), key=_sort_key))
    diffs = tuple(float(fa[s]) - float(fb[s]) for s in seeds)
    return PairedDifference(seeds, diffs, mean_ci(diffs, confidence))


def _sort_key(k: Hashable) -> tuple[int, int, str]:
    return (0, k, "") if isinstance(k, int) else (1, 0, str(k))
