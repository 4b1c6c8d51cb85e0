"""The node's 32-dim profile p_i (SPEC "Context") and its sanitization before it leaves the node.

Layout (``protocol._layout``, part of the wire contract): dims 0-7 one-hot backbone family
(``protocol.FAMILIES``), dims 8-19 the 12 dynamic performance features below, dims 20-31 the
normalised 12-bin histogram of the node's training shard over ``protocol.CATEGORIES``.

Performance features, from the node's evaluation history (oldest first; the last point is this
round). ``lppl`` is log-perplexity scaled into [0, 1]: ``clip(ln(ppl) / ln(1000), 0, 1)``, so
perplexity 1 -> 0, 1000 or more (or +inf) -> 1; lower is better, like the perplexity itself.

====  ==================  =========  ====================================================
dim   name                range      definition
====  ==================  =========  ====================================================
 8    pass1               [0, 1]     Pass@1 of the latest round
 9    codebleu            [0, 1]     CodeBLEU of the latest round
10    lppl                [0, 1]     scaled log-perplexity of the latest round
11    d_pass1             [-1, 1]    pass1 minus the previous round's (0 with one round)
12    d_codebleu          [-1, 1]    codebleu minus the previous round's
13    d_lppl              [-1, 1]    lppl minus the previous round's (negative = better)
14    ema_pass1           [0, 1]     exponential moving average (alpha 0.5) of pass1
15    ema_codebleu        [0, 1]     EMA of codebleu
16    ema_lppl            [0, 1]     EMA of lppl
17    best_pass1          [0, 1]     max pass1 so far
18    best_codebleu       [0, 1]     max codebleu so far
19    best_lppl           [0, 1]     min lppl so far (the best perplexity)
====  ==================  =========  ====================================================

With no history yet (before the first evaluation) the features are pass1 = codebleu = 0 and
lppl = 1 (nothing known is treated as worst), deltas 0, EMA and best equal to those values.

Sanitization (:func:`sanitize_profile`) runs on every vector before it is sent: reject non-finite
input, clip to the ranges above, force the family block to a clean one-hot, optionally add
Laplace noise (perf and histogram only), re-clip, renormalise the histogram, then round to
``decimals`` (rounding last is post-processing, so it keeps the noise's guarantee; the histogram
is rounded by largest remainder so it still sums to exactly 1). The output holds only numbers in
known ranges: no free text, no identifiers (the peer id travels in the message envelope).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from protocol import CATEGORIES, FAMILIES, FAMILY_SLICE, HIST_SLICE, PERF_SLICE, PROFILE_DIM

__all__ = [
    "LOWER",
    "PERF_FEATURES",
    "UPPER",
    "PerfPoint",
    "build_profile",
    "family_of",
    "laplace_sensitivity",
    "sanitize_profile",
]

#: Names of the 12 performance dims, in order (see the table above).
PERF_FEATURES: tuple[str, ...] = (
    "pass1", "codebleu", "lppl", "d_pass1", "d_codebleu", "d_lppl",
    "ema_pass1", "ema_codebleu", "ema_lppl", "best_pass1", "best_codebleu", "best_lppl",
)  # fmt: skip
PPL_CAP = 1000.0
EMA_ALPHA = 0.5

_FAMILY_ALIASES: dict[str, str] = {
    "llama": "llama", "codellama": "llama",
    "qwen": "qwen", "qwen2": "qwen", "qwen2_moe": "qwen", "qwen3": "qwen", "qwen3_moe": "qwen",
    "gpt_neox": "gpt_neox", "gpt_neox_japanese": "gpt_neox",
    "bloom": "bloom",
    "gpt2": "gpt2",
    "mistral": "mistral", "mixtral": "mistral",
    "phi": "phi", "phi3": "phi", "phimoe": "phi",
}  # fmt: skip

LOWER = np.zeros(PROFILE_DIM)
UPPER = np.ones(PROFILE_DIM)
LOWER[PERF_SLICE.start + 3 : PERF_SLICE.start + 6] = -1.0  # the three deltas
LOWER.setflags(write=False)
UPPER.setflags(write=False)
_NOISED = np.zeros(PROFILE_DIM, dtype=bool)
_NOISED[PERF_SLICE] = True
_NOISED[HIST_SLICE] = True


@dataclass(frozen=True, slots=True)
class PerfPoint:
    """One round's evaluation: Pass@1 and CodeBLEU as fractions, perplexity >= 1 (+inf allowed)."""

    pass_at_1: float
    codebleu: float
    perplexity: float

    def __post_init__(self) -> None:
        for name in ("pass_at_1", "codebleu"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name} must be a fraction in [0, 1], got {value!r}")
        if math.isnan(self.perplexity) or self.perplexity <= 0.0:
            raise ValueError(f"perplexity must be positive (inf allowed), got {self.perplexity!r}")


def family_of(model_type: str) -> str:
    """Map a Hugging Face ``config.model_type`` to one of ``protocol.FAMILIES``.

    Cerebras-GPT reports ``gpt2`` and Pythia ``gpt_neox``; anything unknown is ``"other"``.
    """
    key = model_type.strip().lower().replace("-", "_")
    return _FAMILY_ALIASES.get(key, "other")


def build_profile(family: str, history: Sequence[PerfPoint], histogram: np.ndarray) -> np.ndarray:
    """The raw (unsanitized) 32-dim profile, float64, in the protocol layout.

    Args:
        family: one of ``protocol.FAMILIES`` (see :func:`family_of`).
        history: this node's evaluations, oldest first; may be empty.
        histogram: 12 non-negative counts or weights over ``protocol.CATEGORIES``; normalised
            here (all zeros -> uniform).
    Raises:
        ValueError: unknown family, wrong histogram shape, negative or non-finite values.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    vec = np.zeros(PROFILE_DIM, dtype=np.float64)
    vec[FAMILY_SLICE.start + FAMILIES.index(family)] = 1.0
    vec[PERF_SLICE] = _perf_features(history)
    vec[HIST_SLICE] = _normalise_histogram(histogram)
    return vec


def laplace_sensitivity() -> float:
    """L1 sensitivity used for the Laplace noise: the widest change of the noised coordinates.

    We have no per-record bound on how one training example moves Pass@1 or perplexity, so we
    use the worst case over the whole value range: 9 perf dims of width 1 + 3 deltas of width 2
    + 2 for the histogram (the L1 distance between two distributions) = 17. Laplace noise of scale
    ``17 / epsilon`` then makes each released vector epsilon-DP against *any* change of the node's
    state; T rounds compose to T * epsilon. This is honest but heavy: useful values of epsilon
    are large (tens), and at epsilon ~ 1 the profile is mostly noise.
    """
    return float(np.sum((UPPER - LOWER)[PERF_SLICE]) + 2.0)


def sanitize_profile(
    vec: np.ndarray,
    *,
    decimals: int = 2,
    epsilon: float | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """The vector that may leave the node: clipped, optionally noised, renormalised, rounded.

    Args:
        vec: a (32,) profile, e.g. from :func:`build_profile`.
        decimals: rounding precision (0-6); 2 -> buckets of 0.01.
        epsilon: Laplace privacy budget per release (see :func:`laplace_sensitivity`); None = no
            noise. The family one-hot is never noised: it is needed for matching and reveals
            only the backbone family.
        rng: noise source; default a fresh OS-seeded generator (never seed it in production).
    Raises:
        ValueError: wrong shape, NaN or +-inf anywhere, bad decimals or epsilon.
    """
    arr = np.asarray(vec, dtype=np.float64)
    if arr.shape != (PROFILE_DIM,):
        raise ValueError(f"profile must have shape ({PROFILE_DIM},), got {arr.shape}")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(f"profile has non-finite values at dims {bad.tolist()}; refusing to send it")
    if not (isinstance(decimals, int) and 0 <= decimals <= 6):
        raise ValueError(f"decimals must be an int in [0, 6], got {decimals!r}")
    if epsilon is not None and not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be positive and finite, got {epsilon!r}")
    out = np.clip(arr, LOWER, UPPER)
    onehot = np.zeros(FAMILY_SLICE.stop - FAMILY_SLICE.start)
    onehot[int(np.argmax(out[FAMILY_SLICE]))] = 1.0
    out[FAMILY_SLICE] = onehot
    if epsilon is not None:
        gen = rng if rng is not None else np.random.default_rng()
        scale = laplace_sensitivity() / epsilon
        out[_NOISED] += gen.laplace(0.0, scale, size=int(_NOISED.sum()))
        out = np.clip(out, LOWER, UPPER)
    out[PERF_SLICE] = np.round(out[PERF_SLICE], decimals)
    out[HIST_SLICE] = _round_distribution(_normalise_histogram(out[HIST_SLICE]), decimals)
    out += 0.0  # turns any -0.0 into 0.0
    return out


def _perf_features(history: Sequence[PerfPoint]) -> np.ndarray:
    if not history:
        cur = np.array([0.0, 0.0, 1.0])
        return np.concatenate([cur, np.zeros(3), cur, cur])
    rows = np.array([[p.pass_at_1, p.codebleu, _scaled_log_ppl(p.perplexity)] for p in history])
    cur = rows[-1]
    delta = cur - rows[-2] if len(rows) > 1 else np.zeros(3)
    ema = rows[0].copy()
    for row in rows[1:]:
        ema = EMA_ALPHA * row + (1.0 - EMA_ALPHA) * ema
    best = np.array([rows[:, 0].max(), rows[:, 1].max(), rows[:, 2].min()])
    return np.concatenate([cur, delta, ema, best])


def _scaled_log_ppl(ppl: float) -> float:
    if math.isinf(ppl):
        return 1.0
    return min(1.0, max(0.0, math.log(ppl) / math.log(PPL_CAP)))


def _normalise_histogram(histogram: np.ndarray) -> np.ndarray:
    h = np.asarray(histogram, dtype=np.float64)
    if h.shape != (len(CATEGORIES),):
        raise ValueError(f"histogram must have shape ({len(CATEGORIES)},), got {h.shape}")
    if not np.all(np.isfinite(h)) or np.any(h < 0):
        raise ValueError("histogram must be finite and non-negative")
    total = h.sum()
    if total <= 0:
        return np.full(len(CATEGORIES), 1.0 / len(CATEGORIES))
    return h / total


def _round_distribution(p: np.ndarray, decimals: int) -> np.ndarray:
    """Round a distribution to multiples of 10**-decimals that still sum to exactly 1 (largest
    remainder), so rounding cannot make the histogram look like a different shard size."""
    units = 10**decimals
    scaled = p * units
    floor = np.floor(scaled)
    short = int(round(units - floor.sum()))
    order = np.argsort(-(scaled - floor), kind="stable")
    floor[order[:short]] += 1.0
    return floor / units
