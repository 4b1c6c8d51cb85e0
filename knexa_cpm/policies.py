"""Matchmaking policies behind one interface: linucb, random, heuristic, round_robin (+ oracle).

Every policy answers `select(profiles, round_idx, k_max, admissible)` with disjoint ordered
(teacher, student) index pairs, at most K_p = floor(N/2), never a self pair; it does so by
scoring all N x N ordered pairs and handing the matrix to `matching.greedy_disjoint`.
`observe(teacher_profile, student_profile, reward)` feeds back the student's raw Eq. 3 reward.
`state_dict()` is msgpack-safe and `load_state_dict` restores it exactly, RNG included, so a
restarted CPM makes the same next selection.

A profile row is the node's 32 wire dims, optionally followed by its `Profile.skills`
(`profile_row`: ROW_DIM = 44 columns, UNKNOWN_SKILL = -1 in each skill column of a node that
does not share them). Every policy but `hybrid` reads the first 32 columns only.

- `LinUCBPolicy`: KNEXA-FL's matchmaker (SPEC Alg. 1) over a named context builder, rewards
  z-normalised with Welford statistics, exploration beta decaying by a schedule, and an optional
  trust penalty for teachers whose packages keep yielding negative reward (off by default).
- `RandomPolicy`: Random-P2P, uniformly random disjoint pairs and roles.
- `HeuristicPolicy`: Heuristic-P2P (supplement Alg. 3), max JS divergence, better performer teaches.
- `RoundRobinPolicy`: a deterministic rotation, a sanity baseline.
- `SkillGapPolicy`: no learning; the whole round matched on the skill gaps the nodes share (the
  hybrid's skill prior alone, to measure what its learning adds).
- `OraclePolicy`: simulation only; it is handed the true expected-utility matrix each round.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np

from protocol import HIST_SLICE, PERF_SLICE, PROFILE_DIM, SKILLS_DIM

from .bandit import LinUCB
from .features import js_matrix, make_context_builder
from .matching import admissible_mask, default_k, greedy_disjoint, round_matching
from .rewards import RunningNorm

__all__ = [
    "BETA_SCHEDULES",
    "POLICY_NAMES",
    "ROW_DIM",
    "SKILLS_SLICE",
    "UNKNOWN_SKILL",
    "HeuristicPolicy",
    "LinUCBPolicy",
    "OraclePolicy",
    "Policy",
    "RandomPolicy",
    "RoundRobinPolicy",
    "SkillGapPolicy",
    "beta_at",
    "make_policy",
    "profile_row",
]

#: what `make_policy` builds; "oracle" needs the hidden utility and exists only in simulation
POLICY_NAMES: tuple[str, ...] = ("linucb", "hybrid", "random", "heuristic", "round_robin", "skill_gap")
BETA_SCHEDULES: tuple[str, ...] = ("inv_sqrt", "exp", "constant")
#: up to this many agents, policies with `exact_matching` match the whole round (about 3 ms at
#: 256 agents); above it they fall back to greedy, which fits 1,024 agents in the round's budget
EXACT_MAX_N = 256
_PASS1 = PERF_SLICE.start  # PERF dim 0: recent Pass@1


def beta_at(round_idx: int, beta0: float, decay: float, schedule: str = "inv_sqrt") -> float:
    """Exploration weight at round t.

    inv_sqrt: beta0 / sqrt(1 + decay * t) (the classic O(1/sqrt t) decay); exp: beta0 * e^(-decay t);
    constant: beta0. Negative rounds count as 0.
    """
    t = max(int(round_idx), 0)
    if schedule == "inv_sqrt":
        return beta0 / math.sqrt(1.0 + decay * t)
    if schedule == "exp":
        return beta0 * math.exp(-decay * t)
    if schedule == "constant":
        return beta0
    raise ValueError(f"unknown beta schedule {schedule!r}; choose from {BETA_SCHEDULES}")


#: a profile row with the node's skills: the 32 wire dims, then SKILLS_DIM skill columns
ROW_DIM = PROFILE_DIM + SKILLS_DIM
SKILLS_SLICE = slice(PROFILE_DIM, ROW_DIM)
#: every skill column of a node that does not share its skills
UNKNOWN_SKILL = -1.0


def profile_row(vector: Sequence[float], skills: Sequence[float] = ()) -> list[float]:
    """The CPM's row for one node: its profile vector, then its skills (UNKNOWN_SKILL if none)."""
    if len(skills) not in (0, SKILLS_DIM):
        raise ValueError(f"skills must have {SKILLS_DIM} values or none, got {len(skills)}")
    return [*map(float, vector), *(map(float, skills) if len(skills) else [UNKNOWN_SKILL] * SKILLS_DIM)]


def _checked_rows(profiles: np.ndarray) -> np.ndarray:
    p = np.asarray(profiles, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] not in (PROFILE_DIM, ROW_DIM):
        raise ValueError(f"profiles must have shape (N, {PROFILE_DIM}) or (N, {ROW_DIM}), got {p.shape}")
    if not np.isfinite(p).all():
        raise ValueError("profiles must be finite")
    return p


def _profile_rows(profiles: np.ndarray) -> np.ndarray:
    """(N, 32) rows: the wire profile, without any skill columns."""
    return _checked_rows(profiles)[:, :PROFILE_DIM]


def _skill_rows(profiles: np.ndarray) -> np.ndarray:
    """(N, ROW_DIM) rows: skill columns kept, or added as UNKNOWN_SKILL."""
    p = _checked_rows(profiles)
    if p.shape[1] == ROW_DIM:
        return p
    return np.concatenate([p, np.full((p.shape[0], SKILLS_DIM), UNKNOWN_SKILL)], axis=1)


class Policy(ABC):
    """Common select/observe/state machinery; subclasses only score pairs."""

    name = ""

    def __init__(self, seed: int = 42) -> None:
        self.rng = np.random.default_rng(seed)

    def select(self, profiles: np.ndarray, round_idx: int, k_max: int | None = None,
               admissible: np.ndarray | None = None, *,
               peer_ids: Sequence[str] | None = None) -> list[tuple[int, int]]:
        """Disjoint ordered (teacher_idx, student_idx) pairs for this round.

        Args:
            profiles: (N, 32) sanitized profiles, one row per participating agent, or (N, 44)
                rows with skills (`profile_row`).
            round_idx: round number (drives exploration decay and the round-robin rotation).
            k_max: most pairs (None = floor(N/2); larger values are capped at floor(N/2)).
            admissible: optional (N, N) bool mask, True where teacher i may teach student j.
            peer_ids: optional ids of the rows (only the trust penalty uses them).

        Raises:
            ValueError: malformed profiles, mask, or peer_ids.
        """
        p = self._rows(profiles)
        n = p.shape[0]
        mask = None if admissible is None else admissible_mask(n, admissible)
        if peer_ids is not None and len(peer_ids) != n:
            raise ValueError(f"{len(peer_ids)} peer ids for {n} profiles")
        default_k(n, k_max)  # validates k_max
        if n < 2:
            return []
        scores = self.pair_scores(p, round_idx, peer_ids)
        if mask is not None:
            np.copyto(scores, -np.inf, where=~mask)
        if self.exact_matching and n <= EXACT_MAX_N:
            return self._whole_round(scores, k_max)
        return greedy_disjoint(scores, k_max, self.rng, copy=False)

    def _rows(self, profiles: np.ndarray) -> np.ndarray:
        """The columns this policy scores on (the 32 wire dims; `hybrid` keeps the skills)."""
        return _profile_rows(profiles)

    #: choose the round's pairs with `matching.round_matching` (whole-round, up to EXACT_MAX_N
    #: agents) instead of greedy
    exact_matching = False

    def _whole_round(self, scores: np.ndarray, k_max: int | None) -> list[tuple[int, int]]:
        """As many pairs as greedy would make, of the largest total score: every admissible score
        is lifted by more than the whole spread so a pair more always wins, and agents an odd
        cycle of the relaxation left over are then paired greedily."""
        ok = np.isfinite(scores)
        np.fill_diagonal(ok, False)
        if not ok.any():
            return []
        lo, hi = float(scores[ok].min()), float(scores[ok].max())
        lifted = np.where(ok, scores - lo + 1.0 + (hi - lo + 1.0) * scores.shape[0], -np.inf)
        pairs = round_matching(lifted, k_max)
        k = default_k(scores.shape[0], k_max)
        if len(pairs) < k:
            used = np.zeros(scores.shape[0], dtype=bool)
            for i, j in pairs:
                used[i] = used[j] = True
            rest = np.where(used[:, None] | used[None, :], -np.inf, scores)
            pairs += greedy_disjoint(rest, k - len(pairs), self.rng, copy=False)
        return pairs

    @abstractmethod
    def pair_scores(self, profiles: np.ndarray, round_idx: int,
                    peer_ids: Sequence[str] | None = None) -> np.ndarray:
        """(N, N) float64 desirability of teacher i -> student j (a fresh, writable array)."""

    def observe(self, teacher_profile: np.ndarray, student_profile: np.ndarray, reward: float,
                *, teacher_id: str | None = None, student_id: str | None = None) -> None:
        """Feedback for one executed pair; policies that do not learn ignore it."""
        return None

    def observe_batch(self, teacher_profiles: np.ndarray, student_profiles: np.ndarray,
                      rewards: np.ndarray, *, teacher_ids: Sequence[str] | None = None,
                      student_ids: Sequence[str] | None = None) -> None:
        """Feedback for several pairs of one round, in order; same effect as `observe` each."""
        for k, r in enumerate(np.asarray(rewards, dtype=np.float64).reshape(-1).tolist()):
            self.observe(teacher_profiles[k], student_profiles[k], r,
                         teacher_id=None if teacher_ids is None else teacher_ids[k],
                         student_id=None if student_ids is None else student_ids[k])

    def state_dict(self) -> dict[str, Any]:
        # PCG64 state holds 128-bit ints, which msgpack cannot encode: keep it as JSON text
        return {"name": self.name, "rng": json.dumps(self.rng.bit_generator.state)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore `state_dict()`. Raises ValueError if it belongs to another policy."""
        if d.get("name") != self.name:
            raise ValueError(f"state is for policy {d.get('name')!r}, not {self.name!r}")
        self.rng.bit_generator.state = json.loads(d["rng"])


class RandomPolicy(Policy):
    """Random-P2P: i.i.d. uniform scores make greedy pick a uniformly random available pair at
    each step, i.e. uniformly random disjoint pairs and roles among the admissible ones."""

    name = "random"

    def pair_scores(self, profiles: np.ndarray, round_idx: int,
                    peer_ids: Sequence[str] | None = None) -> np.ndarray:
        n = profiles.shape[0]
        return self.rng.random((n, n))


class RoundRobinPolicy(Policy):
    """Teacher i teaches student (i + shift) mod N with shift = 1 + t mod (N - 1): over N - 1
    rounds every agent meets every other once in each role (where disjointness allows)."""

    name = "round_robin"

    def pair_scores(self, profiles: np.ndarray, round_idx: int,
                    peer_ids: Sequence[str] | None = None) -> np.ndarray:
        n = profiles.shape[0]
        shift = 1 + max(int(round_idx), 0) % (n - 1)
        i = np.arange(n)
        scores = np.zeros((n, n))
        scores[i, (i + shift) % n] = 1.0
        return scores


class HeuristicPolicy(Policy):
    """Heuristic-P2P (supplement Alg. 3): greedily pair by max Jensen-Shannon divergence of the
    data histograms; the higher recent performer (PERF dim 0, Pass@1) is the teacher. On equal
    Pass@1 both directions stay open and the seeded tie-break picks one."""

    name = "heuristic"

    def pair_scores(self, profiles: np.ndarray, round_idx: int,
                    peer_ids: Sequence[str] | None = None) -> np.ndarray:
        js = js_matrix(profiles[:, HIST_SLICE])
        perf = profiles[:, _PASS1]
        return np.where(perf[:, None] >= perf[None, :], js, -np.inf)


class SkillGapPolicy(Policy):
    """No learning: score each ordered pair by its shared skill gap sum_c max(0, k_t - k_s)
    (`hybrid.HybridFeatures.skill_gaps`; 0 where either node does not share, ties broken at
    random) and match the whole round. A deployable heuristic for federations whose nodes share
    skills, and the ablation of the hybrid's skill prior: what the rewards add on top of it."""

    name = "skill_gap"
    exact_matching = True

    def _rows(self, profiles: np.ndarray) -> np.ndarray:
        return _skill_rows(profiles)

    def pair_scores(self, profiles: np.ndarray, round_idx: int,
                    peer_ids: Sequence[str] | None = None) -> np.ndarray:
        from .hybrid import HybridFeatures

        gap, _ = HybridFeatures.skill_gaps(profiles)
        return gap + 1e-6 * self.rng.random(gap.shape)  # below the skills' 0.01 resolution


class OraclePolicy(Policy):
    """Simulation only: greedy (or, with `exact`, the maximum-weight matching) on the true
    expected utility, set by `set_utility` every round."""

    name = "oracle"

    def __init__(self, seed: int = 42, *, exact: bool = False) -> None:
        super().__init__(seed)
        self.utility: np.ndarray | None = None
        self.exact = self.exact_matching = exact

    def set_utility(self, utility: np.ndarray) -> None:
        """(N, N) expected reward of teacher i -> student j in the current state."""
        self.utility = np.array(utility, dtype=np.float64, copy=True)

    def pair_scores(self, profiles: np.ndarray, round_idx: int,
                    peer_ids: Sequence[str] | None = None) -> np.ndarray:
        n = profiles.shape[0]
        if self.utility is None or self.utility.shape != (n, n):
            raise ValueError("oracle needs set_utility() with an (N, N) matrix before select()")
        return self.utility.copy()


class LinUCBPolicy(Policy):
    """KNEXA-FL's matchmaker: LinUCB over ordered-pair contexts (SPEC Alg. 1).

    Args:
        context: context builder name (`features.CONTEXT_NAMES`).
        lam: ridge prior A = lam * I.
        beta0, beta_decay, beta_schedule: exploration weight, see `beta_at`.
        seed: seeds the tie-breaking keys.
        reinvert_every: Sherman-Morrison drift bound, see `LinUCB`.
        trust_weight: 0 disables trust. Otherwise a teacher's score is lowered by
            trust_weight * badness, badness an EMA (rate `trust_rate`) of "this teacher's package
            gave a negative raw reward". Needs `peer_ids` in select and `teacher_id` in observe.
    Hyperparameters come from the constructor: `load_state_dict` restores what was learned
    (A, A^-1, b, reward statistics, trust, RNG), so a changed config takes effect on restart.
    """

    name = "linucb"

    def __init__(self, *, context: str = "interaction", lam: float = 0.01, beta0: float = 1.0,
                 beta_decay: float = 0.05, beta_schedule: str = "inv_sqrt", seed: int = 42,
                 reinvert_every: int = 256, trust_weight: float = 0.0, trust_rate: float = 0.2) -> None:
        super().__init__(seed)
        beta_at(0, beta0, beta_decay, beta_schedule)  # validates the schedule name
        if beta0 < 0 or beta_decay < 0 or trust_weight < 0 or not 0 < trust_rate <= 1:
            raise ValueError("beta0, beta_decay, trust_weight must be >= 0 and trust_rate in (0, 1]")
        self.builder = make_context_builder(context)
        self.bandit = LinUCB(self.builder.dim, lam, reinvert_every)
        self.norm = RunningNorm()
        self.beta0, self.beta_decay, self.beta_schedule = float(beta0), float(beta_decay), beta_schedule
        self.trust_weight, self.trust_rate = float(trust_weight), float(trust_rate)
        self.badness: dict[str, float] = {}

    def beta(self, round_idx: int) -> float:
        return beta_at(round_idx, self.beta0, self.beta_decay, self.beta_schedule)

    def pair_scores(self, profiles: np.ndarray, round_idx: int,
                    peer_ids: Sequence[str] | None = None) -> np.ndarray:
        scores = self.builder.ucb_matrix(profiles, self.bandit.theta, self.bandit.A_inv,
                                         self.beta(round_idx))
        if self.trust_weight > 0 and peer_ids is not None:
            bad = np.array([self.badness.get(str(p), 0.0) for p in peer_ids])
            scores -= self.trust_weight * bad[:, None]
        return scores

    def _contexts(self, teacher: np.ndarray, student: np.ndarray) -> np.ndarray:
        return self.builder.build(_profile_rows(np.atleast_2d(teacher)),
                                  _profile_rows(np.atleast_2d(student)))

    def observe(self, teacher_profile: np.ndarray, student_profile: np.ndarray, reward: float,
                *, teacher_id: str | None = None, student_id: str | None = None) -> None:
        """A += x x', b += r_norm x with r_norm the Welford-normalised raw reward (Eq. 3).

        Raises:
            ValueError: malformed profiles or a non-finite reward (state is unchanged).
        """
        x = self._contexts(teacher_profile, student_profile)
        if x.shape[0] != 1:
            raise ValueError("observe takes one teacher and one student profile")
        if not math.isfinite(float(reward)):
            raise ValueError(f"reward must be finite, got {reward!r}")
        self.bandit.update(x[0], self.norm.push(float(reward)))
        if teacher_id is not None:
            self._trust(str(teacher_id), float(reward))

    def observe_batch(self, teacher_profiles: np.ndarray, student_profiles: np.ndarray,
                      rewards: np.ndarray, *, teacher_ids: Sequence[str] | None = None,
                      student_ids: Sequence[str] | None = None) -> None:
        """Many observations at once (Woodbury); equal to `observe` in order, up to rounding.

        Raises:
            ValueError: mismatched lengths, malformed profiles or non-finite rewards (state is
                unchanged).
        """
        x = self._contexts(teacher_profiles, student_profiles)
        r = np.asarray(rewards, dtype=np.float64).reshape(-1)
        if r.shape[0] != x.shape[0] or (teacher_ids is not None and len(teacher_ids) != len(r)):
            raise ValueError("one reward (and teacher id) per pair")
        self.bandit.update_batch(x, self.norm.push_many(r))
        for tid, rew in zip(teacher_ids or (), r.tolist(), strict=False):
            self._trust(str(tid), rew)

    def _trust(self, teacher_id: str, reward: float) -> None:
        old = self.badness.get(teacher_id, 0.0)
        self.badness[teacher_id] = (1.0 - self.trust_rate) * old + self.trust_rate * float(reward < 0)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(), "context": self.builder.name, "dim": self.builder.dim,
            "beta0": self.beta0, "beta_decay": self.beta_decay, "beta_schedule": self.beta_schedule,
            "trust_weight": self.trust_weight, "trust_rate": self.trust_rate,
            "bandit": self.bandit.state_dict(), "norm": self.norm.state_dict(),
            "badness": dict(self.badness),
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore learned state. Raises ValueError if it was saved with another context."""
        if d.get("name") == self.name and d.get("context") != self.builder.name:
            raise ValueError(f"state was learned with context {d.get('context')!r}, this policy uses "
                             f"{self.builder.name!r}; keep the context or move the state away")
        super().load_state_dict(d)
        bandit = LinUCB.from_state_dict(d["bandit"])
        if bandit.dim != self.builder.dim:
            raise ValueError(f"state has dim {bandit.dim}, context {self.builder.name!r} needs {self.builder.dim}")
        bandit.reinvert_every = self.bandit.reinvert_every
        self.bandit = bandit
        self.norm = RunningNorm.from_state(d["norm"])
        self.badness = {str(k): float(v) for k, v in d.get("badness", {}).items()}


#: the hybrid's feature sets: "interaction" (every term; the default, whatever LinUCB's context)
#: and "compact" (the five pair terms only, for federations with few rewards); "concat" is
#: accepted as the default so one config serves both policies
HYBRID_CONTEXTS: tuple[str, ...] = ("interaction", "concat", "compact")
_LINUCB_EXTRA = ("beta_schedule", "reinvert_every", "trust_weight", "trust_rate")
#: the hybrid's own keywords (knexa_cpm.hybrid: the skill prior, the early reward scale, the
#: scale of the Thompson draw and whether the teacher effects' spread is estimated)
_HYBRID_EXTRA = ("skill_prior", "reward_scale", "explore", "adaptive_effects")


def make_policy(name: str, *, context: str = "interaction", lam: float = 0.01, beta0: float = 1.0,
                beta_decay: float = 0.05, seed: int = 42, **kw: Any) -> Policy:
    """The policy called `name` (one of `POLICY_NAMES`).

    LinUCB settings (context, lam, beta*, and the extra keywords beta_schedule, reinvert_every,
    trust_weight, trust_rate) are accepted for every policy so callers can pass one config, and
    ignored by the policies that do not learn.

    Raises:
        ValueError: unknown policy (including "oracle", which only the simulator can build).
        TypeError: unknown keyword.
    """
    unknown = sorted(set(kw) - set(_LINUCB_EXTRA) - set(_HYBRID_EXTRA))
    if unknown:
        raise TypeError(f"make_policy() got unexpected keyword(s) {unknown}")
    hybrid_kw: dict[str, Any] = {k: float(kw.pop(k)) for k in _HYBRID_EXTRA if k in kw}
    if "adaptive_effects" in hybrid_kw:
        hybrid_kw["adaptive_effects"] = bool(hybrid_kw["adaptive_effects"])
    if name == "linucb":
        return LinUCBPolicy(context=context, lam=lam, beta0=beta0, beta_decay=beta_decay, seed=seed, **kw)
    if name == "hybrid":  # its own priors; lam/beta are LinUCB's and do not apply
        from .hybrid import HybridPolicy

        if context not in HYBRID_CONTEXTS:
            raise ValueError(f"hybrid context must be one of {HYBRID_CONTEXTS}, got {context!r}")
        return HybridPolicy(seed=seed, trust_weight=float(kw.get("trust_weight", 0.0)),
                            trust_rate=float(kw.get("trust_rate", 0.2)), compact=context == "compact",
                            **hybrid_kw)
    simple: dict[str, type[Policy]] = {
        "random": RandomPolicy, "heuristic": HeuristicPolicy, "round_robin": RoundRobinPolicy,
        "skill_gap": SkillGapPolicy,
    }
    if name in simple:
        return simple[name](seed)
    hint = " (the oracle needs the hidden utility: knexa_cpm.simulate only)" if name == "oracle" else ""
    raise ValueError(f"unknown policy {name!r}; choose from {POLICY_NAMES}{hint}")
