"""`hybrid`: the default matchmaker. Linear Thompson sampling on richer pair features, identity
effects learned from the rewards, trust scores, and an exact matching of the whole round.

Why not LinUCB on the paper's contexts (measured in docs/cpm.md): a linear model of
[p_t, p_s] is additive and cannot say whether t suits s; the interaction context adds a
same-family flag, which is exactly the pairwise term of the original synthetic world and none
other. What makes a pair good in practice is (a) who the backbones are (tokenizer and
architecture mismatch is a property of the *ordered family pair*, not of "same or not"),
(b) whether the teacher is stronger where the student's data lies, (c) things no profile shows
(a teacher wrong in some categories, a latent affinity between two organisations' data), and
(d) whether this teacher has just taught this student (the gap closes as it is taught).

The model, for ordered pair (t, s):

    reward ~ theta . x(t, s) + b_t + a_{ts} + noise

- x(t, s) = [p_t, p_s, onehot(family_t) x onehot(family_s), t_t * t_s, relu(pass_t - pass_s),
  JS(h_t, h_s), recency of (t -> s), skill gap, both share skills] where t is (Pass@1, CodeBLEU,
  log-ppl, histogram) as in the interaction context and recency the number of times t taught s,
  decayed by `recency_decay` per round. Every term but the last five is a product of per-node
  vectors, so all N^2 scores are matrix products.
- skill gap: when both nodes share their validation Pass@1 per category (`Profile.skills`, the
  skill columns of a profile row), sum_c max(0, k_t[c] - k_s[c]): the categories the teacher
  solves and the student does not, the Oracle-P2P utility estimated from the nodes' own
  validation problems instead of a hidden probe set. On the skills benchmark it ranks teachers
  with Spearman ~0.8 against the true teachable gain where the data histograms reach ~0.25
  (docs/skills.md). 0 when either node does not share; the last flag then is 0 too, so the
  model keeps a separate intercept for pairs it knows nothing about. (A "coverage gap" sum_c h_s[c] relu(h_t[c] - h_s[c]) made no measurable
  difference in the study and cost ~12 N^2 operations, so it is not a feature.)
- theta: Bayesian ridge (prior lam * I) on raw rewards; each round one theta is drawn from the
  posterior N(A^-1 b, v^2 sigma^2 A^-1) (Thompson sampling: exploration without a width term, so
  scoring needs no x' A^-1 x per pair).
- skill prior (optional, `skill_prior` > 0): what knowledge distillation can teach is what the
  teacher knows and the student does not, so the skill-gap coefficient may start at a positive
  prior mean m0 (reward per teachable category), every other coefficient at 0, held with
  `skill_prior_weight` pseudo-rewards per coefficient: A0 = (lam + w) I, b0 = A0 m0 e_gap. That
  is a prior model of the reward, "m0 per category the teacher can add, nothing else". The
  first round then pairs by shared skill gaps instead of at random, and the rewards overrule the
  prior once they outweigh it (the skill gap's own term within a round or two at N = 8; terms
  with small values, such as JS, take longer). `reward_scale` is the reward noise assumed until ten residuals are in (1.0, the
  synthetic world's unit, by default); with rewards in nats of validation loss (~0.1) a unit
  scale makes the first rounds' draws pure noise.
- b_t (per teacher id) and a_{ts} (per unordered pair of ids): Gaussian random effects fitted to
  the residuals of the linear part, shrunk towards 0 with prior variances tau_t^2 and tau_p^2, and
  also sampled each round. They need ids (`peer_ids` in select, `teacher_id`/`student_id` in
  observe); without ids the policy is the linear part alone.
- adaptive effects (optional, `adaptive_effects`): tau_t is estimated from the rewards instead of
  fixed (empirical Bayes: the spread of the teachers' mean residuals beyond what the noise
  explains, by the method of moments), capped at `tau_teacher`. Where the linear part already
  explains the teachers (honest shared skills) the estimate is ~0, so the teacher effects
  neither drift with the noise nor add exploration; a member whose students keep reporting less
  than the model predicts raises it, and is then demoted as with a fixed tau.
- trust scores as in LinUCB: a teacher whose packages keep yielding negative raw rewards loses
  trust_weight * badness * (reward scale) from every score.
- matching: whole-round matching of the sampled scores (`matching.round_matching`) up to
  `EXACT_MAX_N` agents, greedy above; both make floor(N/2) pairs when all are admissible.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from protocol import FAMILY_SLICE, HIST_SLICE, PERF_SLICE, PROFILE_DIM, SKILLS_DIM

from .bandit import array_from_state, array_state
from .features import _one_blas_thread, js_divergence, js_matrix
from .policies import SKILLS_SLICE, Policy, _skill_rows
from .rewards import RunningNorm

__all__ = ["HybridFeatures", "HybridPolicy"]

_T = np.r_[np.arange(PERF_SLICE.start, PERF_SLICE.start + 3), np.arange(HIST_SLICE.start, HIST_SLICE.stop)]
_NF = FAMILY_SLICE.stop - FAMILY_SLICE.start
_PASS1 = PERF_SLICE.start


class HybridFeatures:
    """x(t, s) for the hybrid model; `scores` computes theta . x for all N^2 ordered pairs.

    ``compact=True`` keeps only the five pair terms (relu pass gap, JS, recency, skill gap, both
    share): for small federations, whose few rewards cannot pin down ~150 coefficients.
    """

    n_t = len(_T)
    n_g = 5  # relu pass gap, JS, recency, skill gap, both share skills

    def __init__(self, compact: bool = False) -> None:
        self.compact = compact
        self.dim = self.n_g if compact else 2 * PROFILE_DIM + _NF * _NF + self.n_t + self.n_g
        #: the layout before the skill terms (CPM states saved then load with them at "no data")
        self.dim_without_skills = -1 if compact else self.dim - 2
        #: where the skill-gap coefficient sits (the fourth of the five pair terms, last in x)
        self.gap_index = self.dim - self.n_g + 3

    def build(self, teacher: np.ndarray, student: np.ndarray, recency: np.ndarray) -> np.ndarray:
        """(M, dim) contexts for M (teacher, student) rows (`policies.profile_row`; 32-column
        rows mean skills not shared) and their recency values."""
        t, s = _skill_rows(np.atleast_2d(teacher)), _skill_rows(np.atleast_2d(student))
        fam = (t[:, FAMILY_SLICE, None] * s[:, None, FAMILY_SLICE]).reshape(len(t), _NF * _NF)
        ht, hs = t[:, HIST_SLICE], s[:, HIST_SLICE]
        js = js_divergence(ht, hs)
        kt, ks = t[:, SKILLS_SLICE], s[:, SKILLS_SLICE]
        both = (kt >= 0).all(axis=1) & (ks >= 0).all(axis=1)
        gap = np.where(both, np.maximum(kt - ks, 0.0).sum(axis=1), 0.0)
        g = np.stack([np.maximum(t[:, _PASS1] - s[:, _PASS1], 0.0), js,
                      np.asarray(recency, dtype=np.float64).reshape(-1), gap, both.astype(np.float64)], axis=1)
        if self.compact:
            return g
        tp, sp = t[:, :PROFILE_DIM], s[:, :PROFILE_DIM]
        return np.concatenate([tp, sp, fam, tp[:, _T] * sp[:, _T], g], axis=1)

    @staticmethod
    def skill_gaps(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, N) skill gap and both-share flag for all ordered pairs of (N, ROW_DIM) rows."""
        k = p[:, SKILLS_SLICE]
        known = (k >= 0).all(axis=1)
        both = known[:, None] & known[None, :]
        gap = np.zeros((len(p), len(p)))
        for c in range(SKILLS_DIM):  # 12 (N, N) passes instead of one (N, N, 12) temporary
            gap += np.maximum(k[:, c, None] - k[None, :, c], 0.0)
        return np.where(both, gap, 0.0), both.astype(np.float64)

    def scores(self, rows: np.ndarray, theta: np.ndarray, recency: np.ndarray,
               js: np.ndarray | None = None) -> np.ndarray:
        """(N, N) theta . x(i, j), without building x: one matrix product per factorable block."""
        rows = _skill_rows(rows)
        p = rows[:, :PROFILE_DIM]
        d = PROFILE_DIM
        th_g = theta[-self.n_g:]
        h = p[:, HIST_SLICE]
        n = len(p)
        with _one_blas_thread():
            out = np.zeros((n, n))
            if not self.compact:
                th_t, th_s = theta[:d], theta[d:2 * d]
                o = 2 * d
                th_f = theta[o:o + _NF * _NF].reshape(_NF, _NF)
                th_m = theta[o + _NF * _NF:o + _NF * _NF + self.n_t]
                fam, t = p[:, FAMILY_SLICE], p[:, _T]
                out += (p @ th_t)[:, None] + (p @ th_s)[None, :]
                out += (fam @ th_f) @ fam.T
                out += (t * th_m) @ t.T
            pas = p[:, _PASS1]
            out += th_g[0] * np.maximum(pas[:, None] - pas[None, :], 0.0)
            out += th_g[1] * (js_matrix(h) if js is None else js)
            out += th_g[2] * recency
            if th_g[3] != 0 or th_g[4] != 0:
                gap, both = self.skill_gaps(rows)
                out += th_g[3] * gap + th_g[4] * both
        return out


def _pair_key(a: str, b: str) -> str:
    return f"{a}\x00{b}" if a <= b else f"{b}\x00{a}"


class _Effects:
    """Gaussian random effects by key: posterior mean sum / (n + k) and variance sigma^2 / (n + k)
    with k = sigma^2 / tau^2 (prior N(0, tau^2))."""

    def __init__(self) -> None:
        self.n: dict[str, float] = {}
        self.total: dict[str, float] = {}

    def add(self, key: str, residual: float) -> None:
        self.n[key] = self.n.get(key, 0.0) + 1.0
        self.total[key] = self.total.get(key, 0.0) + residual

    def mean(self, key: str, k: float) -> float:
        n = self.n.get(key, 0.0)
        return self.total.get(key, 0.0) / (n + k)

    def state(self) -> dict[str, Any]:
        return {"n": dict(self.n), "total": dict(self.total)}

    def load(self, d: dict[str, Any]) -> None:
        self.n = {str(k): float(v) for k, v in d["n"].items()}
        self.total = {str(k): float(v) for k, v in d["total"].items()}


class HybridPolicy(Policy):
    """See the module docstring.

    Args:
        lam: ridge prior of theta (in squared reward units).
        explore: v, the scale of the Thompson draw (1 = the posterior itself).
        tau_teacher, tau_pair: prior standard deviations of the teacher and pair effects, in
            units of the reward noise sigma (0 = off). The defaults (explore 0.3, teacher effects
            0.5, pair effects off) were the best of a small sweep at N = 32 (docs/cpm.md); pair
            effects, seen ~1.6 times each in 100 rounds of 32 agents, only added noise.
        recency_decay: per-round decay of the "t taught s recently" feature.
        seed: Thompson draws and greedy tie-breaks.
        compact: the five pair terms only (`HybridFeatures`); chosen with context "compact".
        skill_prior, skill_prior_weight: prior mean of the skill-gap coefficient (reward per
            teachable category; 0 = no prior, the default) and its weight in pseudo-rewards per
            coefficient (all coefficients: the prior says the rest are 0).
        reward_scale: the reward noise sigma assumed until ten residuals are in.
        adaptive_effects: estimate tau_teacher from the rewards (empirical Bayes), with
            `tau_teacher` as its cap; needs residuals of at least three teachers, tau_t = 0 before.
        trust_weight, trust_rate: as `LinUCBPolicy` (0 = off).
    """

    name = "hybrid"
    exact_matching = True

    def __init__(self, *, lam: float = 1.0, explore: float = 0.3, tau_teacher: float = 0.5,
                 tau_pair: float = 0.0, recency_decay: float = 0.8, seed: int = 42,
                 trust_weight: float = 0.0, trust_rate: float = 0.2, forget: float = 1.0,
                 compact: bool = False, skill_prior: float = 0.0, skill_prior_weight: float = 25.0,
                 reward_scale: float = 1.0, adaptive_effects: bool = False) -> None:
        super().__init__(seed)
        if not (math.isfinite(skill_prior) and skill_prior >= 0 and skill_prior_weight >= 0 and reward_scale > 0):
            raise ValueError("need skill_prior >= 0, skill_prior_weight >= 0 and reward_scale > 0")
        if not 0 < forget <= 1:
            raise ValueError("forget must be in (0, 1]")
        self.forget = float(forget)
        if not lam > 0 or explore < 0 or tau_teacher < 0 or tau_pair < 0 or not 0 <= recency_decay < 1:
            raise ValueError("need lam > 0, explore >= 0, tau_* >= 0 and 0 <= recency_decay < 1")
        if trust_weight < 0 or not 0 < trust_rate <= 1:
            raise ValueError("trust_weight must be >= 0 and trust_rate in (0, 1]")
        self.features = HybridFeatures(compact)
        self.lam, self.explore = float(lam), float(explore)
        self.tau_teacher, self.tau_pair, self.recency_decay = float(tau_teacher), float(tau_pair), float(recency_decay)
        self.trust_weight, self.trust_rate = float(trust_weight), float(trust_rate)
        self.skill_prior, self.skill_prior_weight = float(skill_prior), float(skill_prior_weight)
        self.reward_scale = float(reward_scale)
        self.adaptive_effects = bool(adaptive_effects)
        self.A, self.b = self._prior()
        self.resid = RunningNorm()  # residual scale: sigma of the reward noise
        self.rewards = RunningNorm()  # raw reward scale: the unit of the trust penalty
        self.teacher = _Effects()
        self.pair = _Effects()
        self.taught: dict[str, list[float]] = {}  # "t\0s" -> [count at round, round]
        self.badness: dict[str, float] = {}
        self.round = 0
        self._js_key: np.ndarray | None = None
        self._js: np.ndarray | None = None

    def _rows(self, profiles: np.ndarray) -> np.ndarray:
        return _skill_rows(profiles)

    def _prior(self) -> tuple[np.ndarray, np.ndarray]:
        """(A0, b0): ridge lam * I, plus the skill prior on the skill-gap coefficient."""
        d = self.features.dim
        a0 = self.lam * np.eye(d)
        if self.skill_prior == 0:
            return a0, np.zeros(d)
        a0 += self.skill_prior_weight * np.eye(d)
        return a0, a0[:, self.features.gap_index] * self.skill_prior

    # ---- model ---------------------------------------------------------------------------
    @property
    def sigma(self) -> float:
        """Reward noise estimate (`reward_scale` until ten residuals are in)."""
        return self.resid.std if self.resid.count >= 10 else self.reward_scale

    def _recency(self, t_id: str, s_id: str) -> float:
        c = self.taught.get(f"{t_id}\x00{s_id}")
        return 0.0 if c is None else c[0] * self.recency_decay ** max(self.round - c[1], 0)

    def _theta_draw(self) -> np.ndarray:
        with _one_blas_thread():  # a 147 x 147 problem: BLAS threads only spin (features.py)
            return self._theta_draw_inner()

    def _theta_draw_inner(self) -> np.ndarray:
        a_inv = np.linalg.inv(self.A)
        a_inv = 0.5 * (a_inv + a_inv.T)
        mu = a_inv @ self.b
        if self.explore == 0:
            return mu
        chol = np.linalg.cholesky(a_inv + 1e-12 * np.eye(len(mu)))
        return mu + self.explore * self.sigma * (chol @ self.rng.standard_normal(len(mu)))

    def _effect_k(self, tau: float) -> float:
        """k = sigma^2 / (tau sigma)^2 = 1 / tau^2: tau is in units of sigma."""
        return math.inf if tau == 0 else 1.0 / tau ** 2

    def _teacher_k(self) -> float:
        """k of the teacher effects: from `tau_teacher`, or estimated (`adaptive_effects`).

        The estimate: the teachers' mean residuals vary by tau^2 sigma^2 + sigma^2 / n_t, so
        tau^2 sigma^2 ~ var(mean residuals) - mean(sigma^2 / n_t), floored at 0 (k = inf: no
        teacher effects) and capped at `tau_teacher` (k no smaller than 1 / tau_teacher^2).
        """
        k_cap = self._effect_k(self.tau_teacher)
        if not self.adaptive_effects or not math.isfinite(k_cap):
            return k_cap
        if len(self.teacher.n) < 3:
            return math.inf
        n = np.array(list(self.teacher.n.values()))
        means = np.array([self.teacher.total[key] for key in self.teacher.n]) / n
        sig2 = self.sigma ** 2
        spread = float(np.var(means, ddof=1) - np.mean(sig2 / n))
        return max(k_cap, sig2 / spread) if spread > 0 else math.inf

    def _js_all(self, p: np.ndarray) -> np.ndarray:
        hist = p[:, HIST_SLICE]
        if self._js_key is None or self._js_key.shape != hist.shape or not np.array_equal(self._js_key, hist):
            self._js_key, self._js = hist.copy(), js_matrix(hist)
        assert self._js is not None
        return self._js

    def pair_scores(self, profiles: np.ndarray, round_idx: int,
                    peer_ids: Sequence[str] | None = None) -> np.ndarray:
        new_round = max(int(round_idx), 0)
        if self.forget < 1 and new_round > self.round:  # old rewards describe an older federation
            f = self.forget ** (new_round - self.round)
            a0, b0 = self._prior()
            self.A = f * self.A + (1 - f) * a0
            self.b = f * self.b + (1 - f) * b0
        self.round = new_round
        n = profiles.shape[0]
        ids = None if peer_ids is None else [str(x) for x in peer_ids]
        recency = np.zeros((n, n))
        if ids is not None and self.taught:
            index = {pid: k for k, pid in enumerate(ids)}
            for key, (count, last) in self.taught.items():
                t_id, s_id = key.split("\x00")
                if t_id in index and s_id in index:
                    recency[index[t_id], index[s_id]] = count * self.recency_decay ** max(self.round - last, 0)
        scores = self.features.scores(profiles, self._theta_draw(), recency, self._js_all(profiles))
        if ids is None:
            return scores
        sig, v = self.sigma, self.explore
        kt, kp = self._teacher_k(), self._effect_k(self.tau_pair)
        if math.isfinite(kt):
            nt = np.array([self.teacher.n.get(i, 0.0) for i in ids])
            mt = np.array([self.teacher.total.get(i, 0.0) for i in ids]) / (nt + kt)
            scores += (mt + v * sig / np.sqrt(nt + kt) * self.rng.standard_normal(n))[:, None]
        if math.isfinite(kp):
            pn, pm = np.zeros((n, n)), np.zeros((n, n))
            if self.pair.n:
                index = {pid: k for k, pid in enumerate(ids)}
                for key, cnt in self.pair.n.items():
                    a_id, b_id = key.split("\x00")
                    if a_id in index and b_id in index:
                        i, j = index[a_id], index[b_id]
                        pn[i, j] = pn[j, i] = cnt
                        pm[i, j] = pm[j, i] = self.pair.total[key] / (cnt + kp)
            z = self.rng.standard_normal((n, n))
            z = np.triu(z, 1)
            z = z + z.T  # one draw per unordered pair: the affinity is symmetric
            scores += pm + v * sig / np.sqrt(pn + kp) * z
        if self.trust_weight > 0:
            bad = np.array([self.badness.get(i, 0.0) for i in ids])
            scores -= (self.trust_weight * max(self.rewards.std, 1e-6) * bad)[:, None]
        return scores

    # ---- feedback ------------------------------------------------------------------------
    def observe(self, teacher_profile: np.ndarray, student_profile: np.ndarray, reward: float,
                *, teacher_id: str | None = None, student_id: str | None = None) -> None:
        """Update theta's posterior, the identity effects, recency and trust with one reward.

        Raises:
            ValueError: malformed profiles or a non-finite reward (state is unchanged).
        """
        t = _skill_rows(np.atleast_2d(teacher_profile))
        s = _skill_rows(np.atleast_2d(student_profile))
        if t.shape[0] != 1 or s.shape[0] != 1:
            raise ValueError("observe takes one teacher and one student profile")
        r = float(reward)
        if not math.isfinite(r):
            raise ValueError(f"reward must be finite, got {reward!r}")
        tid = None if teacher_id is None else str(teacher_id)
        sid = None if student_id is None else str(student_id)
        rec = self._recency(tid, sid) if tid is not None and sid is not None else 0.0
        x = self.features.build(t, s, np.array([rec]))[0]
        with _one_blas_thread():
            a_inv_b = np.linalg.solve(self.A, self.b)
        residual = r - float(x @ a_inv_b)
        self.A += np.outer(x, x)
        self.b += r * x
        self.resid.update(residual)
        self.rewards.update(r)
        if tid is not None:
            kt = self._teacher_k()
            rest = residual - (self.teacher.mean(tid, kt) if math.isfinite(kt) else 0.0)
            self.teacher.add(tid, residual)
            self.badness[tid] = (1.0 - self.trust_rate) * self.badness.get(tid, 0.0) + self.trust_rate * float(r < 0)
            if sid is not None:
                self.pair.add(_pair_key(tid, sid), rest)
                self.taught[f"{tid}\x00{sid}"] = [rec + 1.0, float(self.round)]

    # ---- persistence ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(), "dim": self.features.dim, "A": array_state(self.A), "b": array_state(self.b),
            "resid": self.resid.state_dict(), "rewards": self.rewards.state_dict(),
            "teacher": self.teacher.state(), "pair": self.pair.state(),
            "taught": {k: list(v) for k, v in self.taught.items()}, "badness": dict(self.badness),
            "round": self.round,
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore learned state (hyperparameters come from the constructor).

        Raises:
            ValueError: the state belongs to another policy or feature layout.
        """
        super().load_state_dict(d)
        dim, old = self.features.dim, self.features.dim_without_skills
        saved = int(d.get("dim", -1))
        if saved not in (dim, old):
            raise ValueError(f"state has dim {d.get('dim')}, the hybrid features need {dim}")
        a, b = array_from_state(d["A"]), array_from_state(d["b"])
        if a.shape != (saved,) * 2 or b.shape != (saved,):
            raise ValueError("hybrid state arrays do not match its dim")
        if saved == old:
            # saved before the skill terms: every reward then had both at 0, which is exactly
            # the prior on the two new dims (ridge, plus the skill prior if any)
            a0, b0 = self._prior()
            a = np.pad(a, (0, dim - old))
            a[old:, old:] = a0[old:, old:]
            b = np.pad(b, (0, dim - old))
            b[old:] = b0[old:]
        self.A, self.b = a, b
        self.resid, self.rewards = RunningNorm.from_state(d["resid"]), RunningNorm.from_state(d["rewards"])
        self.teacher.load(d["teacher"])
        self.pair.load(d["pair"])
        self.taught = {str(k): [float(v[0]), float(v[1])] for k, v in d["taught"].items()}
        self.badness = {str(k): float(v) for k, v in d["badness"].items()}
        self.round = int(d["round"])

    def __repr__(self) -> str:
        shown = {"lam": self.lam, "explore": self.explore, "skill_prior": self.skill_prior,
                 "adaptive_effects": self.adaptive_effects}
        return f"HybridPolicy({json.dumps(shown)})"
