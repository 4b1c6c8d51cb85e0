"""Greedy disjoint selection of ordered (teacher, student) pairs from a score matrix (SPEC step 2)."""

from __future__ import annotations

import numpy as np

__all__ = ["greedy_disjoint"]


def greedy_disjoint(scores: np.ndarray, k_max: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Take pairs in descending score order while both ends are free, up to k_max pairs.

    `scores` is (N, N) with scores[i, j] for teacher i, student j; -inf marks inadmissible pairs
    (the diagonal must be -inf). Ties are broken by a seeded random key, so runs are reproducible.
    """
    n = scores.shape[0]
    flat = scores.ravel()
    admissible = np.flatnonzero(np.isfinite(flat))
    if k_max <= 0 or admissible.size == 0:
        return []
    order = admissible[np.lexsort((rng.random(admissible.size), -flat[admissible]))]
    used = np.zeros(n, dtype=bool)
    pairs: list[tuple[int, int]] = []
    for idx in order:  # stops after k_max picks; conflicts are skipped cheaply
        i, j = divmod(int(idx), n)
        if used[i] or used[j]:
            continue
        used[i] = used[j] = True
        pairs.append((i, j))
        if len(pairs) >= k_max or used.sum() >= n - 1:
            break
    return pairs
