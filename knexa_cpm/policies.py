"""Matchmaking policies behind one interface: linucb, random, heuristic, round_robin.

`select(profiles, round_idx, k_max, admissible)` returns disjoint ordered (teacher, student)
index pairs, at most K_p = floor(N/2); `observe(teacher_profile, student_profile, reward)` feeds
back the student's raw Eq. 3 reward. State round-trips through `state_dict` (msgpack-safe).
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod

import numpy as np

from protocol import HIST_SLICE, PERF_SLICE

from .bandit import LinUCB
from .features import ContextBuilder, js_divergence
from .matching import greedy_disjoint
from .rewards import RunningNorm

__all__ = ["POLICY_NAMES", "Policy", "make_policy"]

POLICY_NAMES = ("linucb", "random", "heuristic", "round_robin")


class Policy(ABC):
    name = ""

    def __init__(self, seed: int = 42) -> None:
        self.rng = np.random.default_rng(seed)

    @staticmethod
    def _k(n: int, k_max: int | None) -> int:
        return n // 2 if k_max is None else min(k_max, n // 2)

    @staticmethod
    def _mask(n: int, admissible: np.ndarray | None) -> np.ndarray:
        mask = np.ones((n, n), dtype=bool) if admissible is None else np.asarray(admissible, dtype=bool).copy()
        np.fill_diagonal(mask, False)
        return mask

    def select(self, profiles: np.ndarray, round_idx: int, k_max: int | None = None,
               admissible: np.ndarray | None = None) -> list[tuple[int, int]]:
        profiles = np.asarray(profiles, dtype=np.float64)
        n = profiles.shape[0]
        if n < 2:
            return []
        scores = self.pair_scores(profiles, round_idx)
        scores = np.where(self._mask(n, admissible), scores, -np.inf)
        return greedy_disjoint(scores, self._k(n, k_max), self.rng)

    @abstractmethod
    def pair_scores(self, profiles: np.ndarray, round_idx: int) -> np.ndarray:
        """(N, N) desirability of teacher i -> student j."""

    def observe(self, teacher_profile: np.ndarray, student_profile: np.ndarray, reward: float) -> None:
        """Non-learning policies ignore feedback."""
        return None

    def state_dict(self) -> dict:
        return {"name": self.name, "rng": json.dumps(self.rng.bit_generator.state)}

    def load_state_dict(self, d: dict) -> None:
        if d.get("name") != self.name:
            raise ValueError(f"state is for policy {d.get('name')!r}, not {self.name!r}")
        self.rng.bit_generator.state = json.loads(d["rng"])


class RandomPolicy(Policy):
    """Random-P2P: uniformly random disjoint pairs and roles."""

    name = "random"

    def pair_scores(self, profiles: np.ndarray, round_idx: int) -> np.ndarray:
        n = profiles.shape[0]
        return self.rng.random((n, n))


class RoundRobinPolicy(Policy):
    """Deterministic rotation: teacher i teaches student (i + shift) mod N, shift cycling by round."""

    name = "round_robin"

    def pair_scores(self, profiles: np.ndarray, round_idx: int) -> np.ndarray:
        n = profiles.shape[0]
        shift = 1 + round_idx % (n - 1)
        i = np.arange(n)
        scores = np.full((n, n), -1.0)
        scores[i, (i + shift) % n] = 1.0
        return scores


class HeuristicPolicy(Policy):
    """Supplement Alg. 3: pair by max JS divergence of data histograms; the better performer teaches."""

    name = "heuristic"

    def pair_scores(self, profiles: np.ndarray, round_idx: int) -> np.ndarray:
        n = profiles.shape[0]
        h = profiles[:, HIST_SLICE]
        js = js_divergence(np.repeat(h, n, axis=0), np.tile(h, (n, 1))).reshape(n, n)
        perf = profiles[:, PERF_SLICE.start]  # recent Pass@1
        better = perf[:, None] > perf[None, :]
        tie = perf[:, None] == perf[None, :]
        # orientation: only the higher performer may teach; on a tie both directions stay open
        return np.where(better | tie, js + 1e-3 * (perf[:, None] - perf[None, :]), -np.inf)


class LinUCBPolicy(Policy):
    """KNEXA-FL's matchmaker: LinUCB over ordered-pair contexts with z-normalised rewards."""

    name = "linucb"

    def __init__(self, *, context: str = "interaction", lam: float = 0.01, beta0: float = 1.0,
                 beta_decay: float = 0.05, seed: int = 42, trust_weight: float = 0.0) -> None:
        super().__init__(seed)
        self.builder = ContextBuilder(context)
        self.bandit = LinUCB(self.builder.dim, lam)
        self.norm = RunningNorm()
        self.beta0 = beta0
        self.beta_decay = beta_decay
        self.trust_weight = trust_weight

    def beta(self, round_idx: int) -> float:
        """Exploration decays as beta0 / sqrt(1 + decay * t)."""
        return self.beta0 / math.sqrt(1.0 + self.beta_decay * max(round_idx, 0))

    def pair_scores(self, profiles: np.ndarray, round_idx: int) -> np.ndarray:
        n = profiles.shape[0]
        out = np.empty(n * n)
        beta = self.beta(round_idx)
        for r0, X in self.builder.all_pairs(profiles):
            out[r0 * n : r0 * n + X.shape[0]] = self.bandit.scores(X, beta)
        # tiny seeded jitter breaks exact ties (e.g. before any update) reproducibly
        return out.reshape(n, n) + 1e-9 * self.rng.random((n, n))

    def observe(self, teacher_profile: np.ndarray, student_profile: np.ndarray, reward: float) -> None:
        self.norm.update(float(reward))
        x = self.builder.build(teacher_profile, student_profile)[0]
        self.bandit.update(x, self.norm.normalise(float(reward)))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "context": self.builder.name, "beta0": self.beta0,
                "beta_decay": self.beta_decay, "bandit": self.bandit.state_dict(), "norm": self.norm.state_dict()}

    def load_state_dict(self, d: dict) -> None:
        super().load_state_dict(d)
        self.builder = ContextBuilder(d["context"])
        self.beta0, self.beta_decay = float(d["beta0"]), float(d["beta_decay"])
        self.bandit.load_state_dict(d["bandit"])
        self.norm = RunningNorm.from_state(d["norm"])


def make_policy(name: str, *, context: str = "interaction", lam: float = 0.01, beta0: float = 1.0,
                beta_decay: float = 0.05, seed: int = 42, **kw: object) -> Policy:
    if name == "linucb":
        return LinUCBPolicy(context=context, lam=lam, beta0=beta0, beta_decay=beta_decay, seed=seed)
    if name == "random":
        return RandomPolicy(seed)
    if name == "heuristic":
        return HeuristicPolicy(seed)
    if name == "round_robin":
        return RoundRobinPolicy(seed)
    raise ValueError(f"unknown policy {name!r}; choose from {POLICY_NAMES}")
