"""Greedy disjoint selection of ordered (teacher, student) pairs from an N x N score matrix.

SPEC Alg. 1 step 2: sort all admissible pairs by score, descending, and take a pair whenever both
of its agents are still free, until K_p pairs (default floor(N/2)) or no free pair is left. Each
agent is in at most one pair per round, in one role.

Why not one full sort: at N = 1,024 there are ~1M ordered pairs and a full argsort costs about
as much as the scoring, yet greedy usually needs only the top few thousand. `greedy_disjoint`
takes the top ~16 * N candidates with `argpartition` (linear time), sorts only those, scans them
in order (vectorised: one numpy pass per pick, not one Python step per candidate), and repeats
on the submatrix of still-free agents until done. Each batch holds every entry >= its smallest
score, and after a batch every entry of it touches a used agent, so the result is exactly that
of one full sort (`greedy_disjoint_naive`).

Ties: exact ties (common: untrained LinUCB scores (i, j) and (j, i) alike) are ordered by seeded
uniform random keys, so nobody gets a systematic edge and a run is reproducible from the
generator's state; distinct scores are never perturbed.
"""

from __future__ import annotations

import numpy as np

__all__ = ["admissible_mask", "default_k", "greedy_disjoint", "greedy_disjoint_naive", "matching_upper_bound",
           "matching_value", "max_weight_matching", "round_matching"]


def default_k(n: int, k_max: int | None = None) -> int:
    """K_p: floor(N/2) by default, never more (an agent is in at most one pair)."""
    if k_max is not None and k_max < 0:
        raise ValueError(f"k_max must be >= 0, got {k_max}")
    return n // 2 if k_max is None else min(int(k_max), n // 2)


def admissible_mask(n: int, admissible: np.ndarray | None = None) -> np.ndarray:
    """(N, N) bool mask of allowed (teacher, student) pairs; the diagonal is always False.

    Raises:
        ValueError: `admissible` is not (N, N).
    """
    if admissible is None:
        mask = np.ones((n, n), dtype=bool)
    else:
        mask = np.array(admissible, dtype=bool, copy=True)
        if mask.shape != (n, n):
            raise ValueError(f"admissible must have shape ({n}, {n}), got {mask.shape}")
    np.fill_diagonal(mask, False)
    return mask


def _prepare(scores: np.ndarray, copy: bool = True) -> np.ndarray:
    s = np.array(scores, dtype=np.float64, copy=copy)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"scores must be a square matrix, got shape {s.shape}")
    nan = np.isnan(s)
    if nan.any():
        s[nan] = -np.inf  # NaN never wins
    np.fill_diagonal(s, -np.inf)  # no self pairs, whatever the caller passed
    return s


def _descending(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices sorting `values` descending; exact ties in random order (keys drawn only then)."""
    order = np.argsort(-values, kind="stable")
    v = values[order]
    tie = v[1:] == v[:-1]
    if tie.any():
        # run ids are ascending along `order`; id + key/2 reorders only within each run of ties
        run = np.concatenate([[0.0], np.cumsum(~tie)])
        order = order[np.argsort(run + 0.5 * rng.random(values.size))]
    return order


def _scan(teachers: np.ndarray, students: np.ndarray, used: np.ndarray, k_left: int,
          chunk: int = 4096) -> list[tuple[int, int]]:
    """Greedy over candidates already in descending order; marks picked agents in `used`."""
    picks: list[tuple[int, int]] = []
    for c0 in range(0, teachers.size, chunk):
        a, b = teachers[c0:c0 + chunk], students[c0:c0 + chunk]
        alive = ~(used[a] | used[b])
        f = int(alive.argmax())
        while alive[f]:
            i, j = int(a[f]), int(b[f])
            picks.append((i, j))
            used[i] = used[j] = True
            if len(picks) >= k_left:
                return picks
            ra, rb = a[f:], b[f:]
            alive[f:] &= (ra != i) & (ra != j) & (rb != i) & (rb != j)
            f = int(alive.argmax())
    return picks


def greedy_disjoint(scores: np.ndarray, k_max: int | None, rng: np.random.Generator,
                    *, batch: int | None = None, copy: bool = True) -> list[tuple[int, int]]:
    """Disjoint (teacher, student) pairs by descending score, at most `default_k(N, k_max)`.

    Args:
        scores: (N, N), scores[i, j] for teacher i -> student j; -inf (or NaN) = not admissible.
            The diagonal is ignored.
        k_max: most pairs to return (None = floor(N/2)).
        rng: source of the tie-breaking keys (drawn only when a batch holds exact ties).
        batch: candidates per partition step (default max(16 * free agents, 2048)); it doubles
            while batches yield under 1/8 of the pairs still wanted. Only speed depends on it.
        copy: False lets the function overwrite `scores` (the policies pass fresh arrays).

    Returns:
        pairs in the order they were picked (descending score).
    """
    s = _prepare(scores, copy)
    n = s.shape[0]
    k = default_k(n, k_max)
    used = np.zeros(n, dtype=bool)
    pairs: list[tuple[int, int]] = []
    free = np.arange(n)
    grow = 1
    while len(pairs) < k and free.size >= 2:
        sub = s if free.size == n else s[np.ix_(free, free)]
        m = free.size
        flat = sub.ravel()
        want = grow * (batch if batch is not None else max(16 * m, 2048))
        if flat.size > want:
            top = np.argpartition(flat, flat.size - want)[flat.size - want:]
            threshold = flat[top].min()
            cand = np.flatnonzero(flat >= threshold) if threshold > -np.inf else top
        else:
            cand = np.arange(flat.size)
        cand = cand[flat[cand] > -np.inf]
        if cand.size == 0:
            break
        order = cand[_descending(flat[cand], rng)]
        wanted = k - len(pairs)
        got = _scan(free[order // m], free[order % m], used, wanted)
        pairs += got
        if len(got) < wanted / 8:
            grow *= 2
        free = np.flatnonzero(~used)
    return pairs


def greedy_disjoint_naive(scores: np.ndarray, k_max: int | None,
                          rng: np.random.Generator) -> list[tuple[int, int]]:
    """Reference: one full sort of all admissible pairs, then a Python loop. Given a generator
    in the same state it returns what `greedy_disjoint` returns, exactly so when no two scores
    tie (ties are broken by random keys in both, but drawn over different candidate sets)."""
    s = _prepare(scores)
    n = s.shape[0]
    k = default_k(n, k_max)
    flat = s.ravel()
    cand = np.flatnonzero(flat > -np.inf)
    order = cand[_descending(flat[cand], rng)]
    used = np.zeros(n, dtype=bool)
    pairs: list[tuple[int, int]] = []
    for idx in order.tolist():
        if len(pairs) >= k:
            break
        i, j = divmod(idx, n)
        if not (used[i] or used[j]):
            used[i] = used[j] = True
            pairs.append((i, j))
    return pairs


def _oriented(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Undirected weights w = max(s_ij, s_ji) and whether i teaches j in the better orientation."""
    forward = s >= s.T
    return np.where(forward, s, s.T), forward


def _relaxation(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """The assignment relaxation of the round's matching.

    On symmetric weights w = max(s_ij, s_ji) a matching M gives an assignment of value 2 w(M)
    (each pair a 2-cycle, everyone else a self-loop of weight 0), so the best assignment
    (Hungarian, `scipy.optimize.linear_sum_assignment`) is worth at least twice the best
    matching. Non-positive pairs cost 1 there, so its cycles never run through pairs not worth
    taking. Returns (w, forward, successor of each agent, upper bound on the best matching).
    """
    from scipy.optimize import linear_sum_assignment

    s = _prepare(scores)
    w, forward = _oriented(s)
    gain = np.where(w > 0, w, -1.0)
    np.fill_diagonal(gain, 0.0)
    rows, cols = linear_sum_assignment(gain, maximize=True)
    succ = np.empty(s.shape[0], dtype=np.int64)
    succ[rows] = cols
    return w, forward, succ, float(gain[rows, cols].sum()) / 2.0


def matching_upper_bound(scores: np.ndarray) -> float:
    """An upper bound on the total score of any set of disjoint ordered pairs (exact whenever the
    assignment relaxation is integral, which `round_matching` reports)."""
    if np.asarray(scores).shape[0] < 2:
        return 0.0
    return _relaxation(scores)[3]


def round_matching(scores: np.ndarray, k_max: int | None = None) -> list[tuple[int, int]]:
    """Disjoint ordered pairs of (near-)maximum total score for the whole round, at most
    `default_k(N, k_max)`; pairs whose better orientation scores <= 0 are left out.

    From the assignment relaxation (`_relaxation`): its 2-cycles are pairs; from every longer
    cycle the best set of alternate edges is taken. When there are no longer cycles the result is
    a maximum-weight matching (the relaxation's bound is attained). With a `k_max` below N/2 the
    best pairs are kept. Why not greedy: greedy can lock in one good pair that blocks two better
    ones; this costs one Hungarian solve (about 3 ms at 256 agents).
    """
    s = np.asarray(scores, dtype=np.float64)
    n = s.shape[0]
    k = default_k(n, k_max)
    if n < 2 or k == 0:
        return []
    w, forward, succ, _ = _relaxation(s)
    seen = np.zeros(n, dtype=bool)
    pairs: list[tuple[int, int]] = []
    for start in range(n):
        if seen[start]:
            continue
        cycle = [start]
        seen[start] = True
        nxt = int(succ[start])
        while nxt != start:
            cycle.append(nxt)
            seen[nxt] = True
            nxt = int(succ[nxt])
        m = len(cycle)
        if m < 2:
            continue
        edges = [(cycle[q], cycle[(q + 1) % m]) for q in range(m)] if m > 2 else [(cycle[0], cycle[1])]
        if m > 2:
            options = [[edges[(o + 2 * q) % m] for q in range(m // 2)] for o in range(m)]
            edges = max(options, key=lambda opt: sum(max(w[i, j], 0.0) for i, j in opt))
        pairs += [(i, j) for i, j in edges if w[i, j] > 0]
    pairs.sort(key=lambda ij: -w[ij])
    return [(i, j) if forward[i, j] else (j, i) for i, j in pairs[:k]]


def max_weight_matching(scores: np.ndarray, k_max: int | None = None) -> list[tuple[int, int]]:
    """Disjoint ordered pairs of the largest total score, at most `default_k(N, k_max)`: exact.

    `round_matching` when the assignment relaxation is integral; otherwise (odd cycles, or a
    `k_max` below N/2) the matching integer programme solved by HiGHS (`scipy.optimize.milp`),
    which can take a second at 64 agents: a reference for tests, not for every round.
    """
    s = _prepare(scores)
    n = s.shape[0]
    k = default_k(n, k_max)
    if n < 2 or k == 0:
        return []
    w, forward, succ, _ = _relaxation(s)
    if k == n // 2 and np.array_equal(succ[succ], np.arange(n)):
        return round_matching(s, k_max)
    pos = np.where(w > 0, w, 0.0)
    np.fill_diagonal(pos, 0.0)
    return [(i, j) if forward[i, j] else (j, i) for i, j in _milp_matching(pos, k)]


def _milp_matching(pos: np.ndarray, k: int) -> list[tuple[int, int]]:
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix, vstack

    n = pos.shape[0]
    iu, ju = np.triu_indices(n, 1)
    keep = pos[iu, ju] > 0
    iu, ju = iu[keep], ju[keep]
    if iu.size == 0:
        return []
    m = iu.size
    cols = np.r_[np.arange(m), np.arange(m)]
    incidence = coo_matrix((np.ones(2 * m), (np.r_[iu, ju], cols)), shape=(n, m))
    a = vstack([incidence, coo_matrix(np.ones((1, m)))])
    ub = np.r_[np.ones(n), float(k)]
    res = milp(-pos[iu, ju], constraints=LinearConstraint(a, 0, ub), integrality=np.ones(m), bounds=Bounds(0, 1))
    if res.x is None:  # pragma: no cover - HiGHS always solves this bounded, feasible programme
        raise RuntimeError(f"matching programme failed: {res.message}")
    on = res.x > 0.5
    return [(int(i), int(j)) for i, j in zip(iu[on], ju[on], strict=True)]


def matching_value(scores: np.ndarray, pairs: list[tuple[int, int]]) -> float:
    """Total score of ordered pairs (0.0 for none)."""
    if not pairs:
        return 0.0
    te, st = np.asarray(pairs, dtype=np.int64).T
    return float(np.asarray(scores, dtype=np.float64)[te, st].sum())

