"""Pair contexts x_ij for ordered (teacher i, student j) pairs, built in vectorised blocks.

`concat` is the paper's x = [p_i, p_j]. Under a *linear* reward model it is additive,
theta.x = f(p_i) + g(p_j), so it can rank good teachers and needy students but cannot express
*compatibility* between them (SPEC "Our decisions"). `interaction` adds |p_i - p_j| and p_i * p_j
on the performance and histogram blocks, the Jensen-Shannon divergence of the two histograms, a
same-family flag and a bias, so the bandit can learn which combinations help.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from protocol import FAMILY_SLICE, HIST_SLICE, PERF_SLICE, PROFILE_DIM

__all__ = ["CONTEXT_NAMES", "ContextBuilder", "js_divergence", "make_context_builder"]

_EPS = 1e-12
_PH = np.r_[np.arange(PERF_SLICE.start, PERF_SLICE.stop), np.arange(HIST_SLICE.start, HIST_SLICE.stop)]


def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Row-wise Jensen-Shannon divergence (base 2, in [0, 1]) of histogram rows."""
    p = np.clip(p, 0.0, None)
    q = np.clip(q, 0.0, None)
    p = p / np.maximum(p.sum(axis=-1, keepdims=True), _EPS)
    q = q / np.maximum(q.sum(axis=-1, keepdims=True), _EPS)
    m = 0.5 * (p + q)

    def kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(a > 0, a * np.log2(np.maximum(a, _EPS) / np.maximum(b, _EPS)), 0.0)
        return t.sum(axis=-1)

    return np.clip(0.5 * kl(p, m) + 0.5 * kl(q, m), 0.0, 1.0)


class ContextBuilder:
    """Maps teacher and student profile rows (M, 32) to contexts (M, dim)."""

    def __init__(self, name: str) -> None:
        if name not in CONTEXT_NAMES:
            raise ValueError(f"unknown context builder {name!r}; choose from {CONTEXT_NAMES}")
        self.name = name
        self.dim = 2 * PROFILE_DIM if name == "concat" else 2 * PROFILE_DIM + 2 * len(_PH) + 3

    def build(self, teacher: np.ndarray, student: np.ndarray) -> np.ndarray:
        teacher = np.atleast_2d(np.asarray(teacher, dtype=np.float64))
        student = np.atleast_2d(np.asarray(student, dtype=np.float64))
        if self.name == "concat":
            return np.concatenate([teacher, student], axis=1)
        t, s = teacher[:, _PH], student[:, _PH]
        js = js_divergence(teacher[:, HIST_SLICE], student[:, HIST_SLICE])[:, None]
        fam_t = teacher[:, FAMILY_SLICE].argmax(axis=1)
        fam_s = student[:, FAMILY_SLICE].argmax(axis=1)
        same = (fam_t == fam_s).astype(np.float64)[:, None]
        bias = np.ones((teacher.shape[0], 1))
        return np.concatenate([teacher, student, np.abs(t - s), t * s, js, same, bias], axis=1)

    def all_pairs(self, profiles: np.ndarray, block_rows: int = 64) -> Iterator[tuple[int, np.ndarray]]:
        """Contexts of every ordered pair, one teacher-row block at a time: (row0, (b*N, dim)).

        Blocks bound memory at block_rows * N * dim floats instead of N^2 * dim.
        """
        n = profiles.shape[0]
        for r0 in range(0, n, block_rows):
            r1 = min(n, r0 + block_rows)
            t = np.repeat(profiles[r0:r1], n, axis=0)
            s = np.tile(profiles, (r1 - r0, 1))
            yield r0, self.build(t, s)


CONTEXT_NAMES = ("concat", "interaction")


def make_context_builder(name: str) -> ContextBuilder:
    return ContextBuilder(name)
