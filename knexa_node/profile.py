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

Noise comes from the OS's CSPRNG (:func:`laplace_noise`, ``secrets.SystemRandom``): nothing the
CPM knows (peer id, round, earlier profiles) predicts it, and a restart does not replay it.
:class:`PrivacyAccountant` meters the releases: each noised profile costs ``epsilon`` (basic
sequential composition), the spent total is persisted with the node's state, and once the next
release would exceed the budget the node stops releasing fresh dynamic features and re-sends the
last noised ones (post-processing of an earlier release, which costs nothing). See
docs/security.md "Profile privacy" for the defaults and the measured utility curve.

Skills (optional, ``share_skills``): the node's greedy Pass@1 per category on its own validation
problems, 12 values in [0, 1] in ``protocol.CATEGORIES`` order (:func:`skills_vector`), sent in
``Profile.skills`` beside the 32 dims. They are sanitized the same way (:func:`sanitize_skills`,
L1 sensitivity :data:`SKILLS_SENSITIVITY` = 12) and metered as a separate release composed
sequentially with the profile's (:meth:`PrivacyAccountant.release_skills`): sharing them costs a
second ``epsilon`` each round.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from protocol import (
    CATEGORIES,
    FAMILIES,
    FAMILY_SLICE,
    HIST_SLICE,
    PERF_SLICE,
    PROFILE_DIM,
    SKILLS_DIM,
)

__all__ = [
    "DEFAULT_EPSILON",
    "DEFAULT_EPSILON_BUDGET",
    "LOWER",
    "PERF_FEATURES",
    "SKILLS_SENSITIVITY",
    "UPPER",
    "PerfPoint",
    "PrivacyAccountant",
    "build_profile",
    "family_of",
    "laplace_noise",
    "laplace_sensitivity",
    "sanitize_profile",
    "sanitize_skills",
    "skills_vector",
]

#: Names of the 12 performance dims, in order (see the table above).
PERF_FEATURES: tuple[str, ...] = (
    "pass1", "codebleu", "lppl", "d_pass1", "d_codebleu", "d_lppl",
    "ema_pass1", "ema_codebleu", "ema_lppl", "best_pass1", "best_codebleu", "best_lppl",
)  # fmt: skip
PPL_CAP = 1000.0
EMA_ALPHA = 0.5
#: default per-round epsilon of the Laplace noise, chosen from the measured matching-quality curve
#: (docs/security.md "Profile privacy"; `knexa-cpm privacy-study`)
DEFAULT_EPSILON = 100.0
#: default total budget: 50 fresh releases at the default epsilon, then the profile is frozen
#: (25 rounds when the node also shares its skills: each round then makes two releases)
DEFAULT_EPSILON_BUDGET = 5000.0
#: L1 sensitivity of the skills vector: 12 dims of width 1, worst case over the whole range (as
#: :func:`laplace_sensitivity`: no per-record bound on how one example moves a category's Pass@1)
SKILLS_SENSITIVITY = float(SKILLS_DIM)

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


def _checked_release(values: np.ndarray, dim: int, what: str, decimals: int, epsilon: float | None) -> np.ndarray:
    """``values`` as a float64 vector of ``dim`` finite numbers, and valid release settings.

    Raises:
        ValueError: wrong shape, NaN or +-inf (naming the dims), bad decimals or epsilon.
    """
    arr = np.asarray(values, dtype=np.float64)
    if arr.shape != (dim,):
        raise ValueError(f"{what} must have shape ({dim},), got {arr.shape}")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(f"{what}: non-finite values at dims {bad.tolist()}; refusing to send it")
    if not (isinstance(decimals, int) and 0 <= decimals <= 6):
        raise ValueError(f"decimals must be an int in [0, 6], got {decimals!r}")
    if epsilon is not None and not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be positive and finite, got {epsilon!r}")
    return arr


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
        rng: noise source for simulations and tests only; default (None) draws from the OS's
            CSPRNG through :func:`laplace_noise`. Never pass a seeded generator in a node: anyone
            who knows the seed can subtract the noise.
    Raises:
        ValueError: wrong shape, NaN or +-inf anywhere, bad decimals or epsilon.
    """
    arr = _checked_release(vec, PROFILE_DIM, "profile", decimals, epsilon)
    out = np.clip(arr, LOWER, UPPER)
    onehot = np.zeros(FAMILY_SLICE.stop - FAMILY_SLICE.start)
    onehot[int(np.argmax(out[FAMILY_SLICE]))] = 1.0
    out[FAMILY_SLICE] = onehot
    if epsilon is not None:
        scale = laplace_sensitivity() / epsilon
        out[_NOISED] += laplace_noise(scale, int(_NOISED.sum()), rng=rng)
        out = np.clip(out, LOWER, UPPER)
    out[PERF_SLICE] = np.round(out[PERF_SLICE], decimals)
    out[HIST_SLICE] = _round_distribution(_normalise_histogram(out[HIST_SLICE]), decimals)
    out += 0.0  # turns any -0.0 into 0.0
    return out


def skills_vector(per_category: Mapping[str, float]) -> np.ndarray:
    """The raw (12,) skills vector in ``protocol.CATEGORIES`` order from ``{category: Pass@1}``.

    A category absent from the mapping is 0.0: the node has no validation problem there, so it
    has shown nothing solved (and "absent" must not be told apart from "failed all" on the wire).

    Raises:
        ValueError: a key that is not one of ``protocol.CATEGORIES``, or a value that is not a
            finite fraction in [0, 1].
    """
    unknown = sorted(set(per_category) - set(CATEGORIES))
    if unknown:
        raise ValueError(f"unknown categories {unknown}; expected some of {CATEGORIES}")
    out = np.zeros(SKILLS_DIM, dtype=np.float64)
    for i, name in enumerate(CATEGORIES):
        if name not in per_category:
            continue
        value = float(per_category[name])
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"skill {name!r} must be a fraction in [0, 1], got {per_category[name]!r}")
        out[i] = value
    return out


def sanitize_skills(
    skills: np.ndarray,
    *,
    decimals: int = 2,
    epsilon: float | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """The skills vector that may leave the node: clipped to [0, 1], optionally noised, rounded.

    Same steps as :func:`sanitize_profile` on the 12 dims: Laplace noise of scale
    ``SKILLS_SENSITIVITY / epsilon`` (12 dims of width 1 give an L1 sensitivity of 12 against any
    change of the node's state), re-clip, round to ``decimals`` last (post-processing).

    Args:
        skills: a (12,) vector, e.g. from :func:`skills_vector`.
        decimals: rounding precision (0-6).
        epsilon: Laplace privacy budget of this release; None = no noise.
        rng: simulations and tests only (see :func:`sanitize_profile`); default: the OS CSPRNG.
    Raises:
        ValueError: wrong shape, NaN or +-inf anywhere, bad decimals or epsilon.
    """
    arr = _checked_release(skills, SKILLS_DIM, "skills", decimals, epsilon)
    out = np.clip(arr, 0.0, 1.0)
    if epsilon is not None:
        out = np.clip(out + laplace_noise(SKILLS_SENSITIVITY / epsilon, SKILLS_DIM, rng=rng), 0.0, 1.0)
    out = np.round(out, decimals)
    out += 0.0  # turns any -0.0 into 0.0
    return out


def laplace_noise(scale: float, size: int, *, rng: np.random.Generator | None = None) -> np.ndarray:
    """``size`` draws of Laplace(0, ``scale``); from ``secrets.SystemRandom`` (the OS CSPRNG) unless
    a generator is passed (simulations and tests only).

    Inverse CDF: for u uniform on (-1/2, 1/2), ``-scale * sign(u) * ln(1 - 2|u|)``. The OS draws are
    53-bit floats; u = -1/2 exactly (probability 2**-53) is redrawn so the result stays finite.
    """
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be positive and finite, got {scale!r}")
    if rng is not None:
        return rng.laplace(0.0, scale, size=size)
    source = secrets.SystemRandom()
    out = np.empty(size, dtype=np.float64)
    for i in range(size):
        u = 0.0
        while u == 0.0:
            u = source.random()
        u -= 0.5
        out[i] = -scale * math.copysign(1.0, u) * math.log(1.0 - 2.0 * abs(u))
    return out


class PrivacyAccountant:
    """Per-release epsilon, a total budget, and what the node sends once the budget is spent.

    Composition is basic (sequential): k releases of an epsilon-DP mechanism are (k * epsilon)-DP.
    Advanced composition (Dwork, Rothblum and Vadhan 2010) gives
    ``sqrt(2k ln(1/delta)) * eps + k * eps * (e**eps - 1)``, whose second term alone is at least
    ``k * eps`` once eps >= ln 2, whatever k and delta; useful profiles need eps in the tens (the
    sensitivity is 17, :func:`laplace_sensitivity`), so the basic sum is the tighter bound here.

    Args:
        epsilon: cost of one noised release; 0 turns noise off (nothing is accounted: the spent
            budget is then unbounded and reported as such).
        budget: total epsilon the node may spend; ``math.inf`` = no limit. When the next release
            would exceed it, :meth:`release` re-sends the last noised dynamic features (or, if
            there never was one, the data-independent "nothing known" features and a uniform
            histogram), which costs nothing.

    Skills (:meth:`release_skills`) are a separate release of their own, charged the same
    ``epsilon`` against the same budget (sequential composition with the profile's): a node that
    shares them spends ``2 * epsilon`` per round. Once a fresh one no longer fits, the last
    released skills are re-sent (free), or none at all if there never was one.
    """

    def __init__(self, epsilon: float, budget: float = math.inf, *, shares_skills: bool = False) -> None:
        self.epsilon = 0.0
        self.budget = math.inf
        self.shares_skills = False
        self.configure(epsilon, budget, shares_skills=shares_skills)
        self.spent = 0.0
        self.releases = 0
        self.unnoised_releases = 0  # sent with noise off: their privacy loss is unbounded
        self.frozen_releases = 0
        self.last: np.ndarray | None = None  # the dynamic dims (perf + histogram) last released
        self.skills_releases = 0  # fresh skills releases (noised, or unnoised with noise off)
        self.last_skills: np.ndarray | None = None  # the skills last released

    def configure(self, epsilon: float, budget: float, *, shares_skills: bool = False) -> None:
        """Set the per-release epsilon, the total budget and whether skills are released too, so
        a round costs two releases (SIGHUP); what was spent stays spent."""
        if not (math.isfinite(epsilon) and epsilon >= 0):
            raise ValueError(f"epsilon must be >= 0 and finite, got {epsilon!r}")
        if math.isnan(budget) or budget < 0:
            raise ValueError(f"budget must be >= 0 (inf = no limit), got {budget!r}")
        self.epsilon = float(epsilon)
        self.budget = float(budget)
        self.shares_skills = bool(shares_skills)

    @property
    def noise_on(self) -> bool:
        return self.epsilon > 0

    def can_release(self) -> bool:
        """True when a fresh noised release fits the remaining budget (always, with noise off)."""
        if not self.noise_on:
            return True
        return self.spent + self.epsilon <= self.budget * (1 + 1e-12)

    @property
    def exhausted(self) -> bool:
        return not self.can_release()

    def release(self, raw: np.ndarray, *, decimals: int = 2, rng: np.random.Generator | None = None) -> np.ndarray:
        """The sanitized vector to send this round, charging the budget if it is a fresh release.

        Raises:
            ValueError: as :func:`sanitize_profile`.
        """
        if self.can_release():
            out = sanitize_profile(raw, decimals=decimals, epsilon=self.epsilon or None, rng=rng)
            if self.noise_on:
                self.spent += self.epsilon
            else:
                self.unnoised_releases += 1
            self.releases += 1
            self.last = out[_NOISED].copy()
            return out
        out = sanitize_profile(raw, decimals=decimals)  # validates; only the family one-hot is kept
        if self.last is not None:
            out[_NOISED] = self.last
        else:
            out[PERF_SLICE] = _perf_features(())
            out[HIST_SLICE] = _round_distribution(np.full(len(CATEGORIES), 1.0 / len(CATEGORIES)), decimals)
        self.frozen_releases += 1
        return out

    def release_skills(
        self, skills: np.ndarray, *, decimals: int = 2, rng: np.random.Generator | None = None
    ) -> np.ndarray | None:
        """The sanitized skills to send this round, or None to send none.

        A fresh release when it fits the budget (noised with ``epsilon``, charged ``epsilon``; with
        noise off counted as an unnoised release); otherwise the last released skills again
        (post-processing, free), or None if skills were never released.

        Raises:
            ValueError: as :func:`sanitize_skills`.
        """
        if self.can_release():
            out = sanitize_skills(skills, decimals=decimals, epsilon=self.epsilon or None, rng=rng)
            if self.noise_on:
                self.spent += self.epsilon
            else:
                self.unnoised_releases += 1
            self.skills_releases += 1
            self.last_skills = out.copy()
            return out
        sanitize_skills(skills, decimals=decimals)  # validates; the values are not used
        return None if self.last_skills is None else self.last_skills.copy()

    def summary(self) -> dict[str, Any]:
        """What `status` shows: epsilon per release and per round (two releases when skills are
        shared), spent and total budget, releases, exhaustion."""
        return {
            "noise": "laplace" if self.noise_on else "off",
            "epsilon_per_release": self.epsilon,
            "epsilon_per_round": self.epsilon * (2 if self.shares_skills else 1),
            "epsilon_spent": None if self.unnoised_releases else round(self.spent, 6),  # None = unbounded
            "epsilon_budget": None if math.isinf(self.budget) else self.budget,
            "releases": self.releases,
            "frozen_releases": self.frozen_releases,
            "skills_releases": self.skills_releases,
            "exhausted": self.exhausted,
        }

    def to_state(self) -> dict[str, Any]:
        return {"spent": self.spent, "releases": self.releases, "unnoised_releases": self.unnoised_releases,
                "frozen_releases": self.frozen_releases,
                "last": None if self.last is None else [float(x) for x in self.last],
                "skills_releases": self.skills_releases,
                "last_skills": None if self.last_skills is None else [float(x) for x in self.last_skills]}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`to_state` saved (the spent budget survives restarts and config changes)."""
        self.spent = float(state.get("spent", 0.0))
        self.releases = int(state.get("releases", 0))
        self.unnoised_releases = int(state.get("unnoised_releases", 0))
        self.frozen_releases = int(state.get("frozen_releases", 0))
        last = state.get("last")
        self.last = None if last is None else np.asarray(last, dtype=np.float64)
        if self.last is not None and self.last.shape != (int(_NOISED.sum()),):
            raise ValueError(f"saved privacy state has {self.last.shape} dynamic dims, expected {int(_NOISED.sum())}")
        # states saved before skills existed have neither key: no skills were ever released
        self.skills_releases = int(state.get("skills_releases", 0))
        last_skills = state.get("last_skills")
        self.last_skills = None if last_skills is None else np.asarray(last_skills, dtype=np.float64)
        if self.last_skills is not None and self.last_skills.shape != (SKILLS_DIM,):
            raise ValueError(f"saved privacy state has {self.last_skills.shape} skills, expected {SKILLS_DIM}")


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
