"""The synthetic federation behind `knexa-cpm simulate`: hidden truth, dynamics, visible profiles.

Everything here is fixed before any policy runs and is the same for every policy (SPEC "Synthetic
CPM study"): the world draws its agents, its reward noise and its evaluation noise from the seed
alone, and every policy replays those exact draws on its own copy of the state.

Generative model (one federation of N agents over C = 12 problem categories):

- Data: histogram h_i ~ Dirichlet(alpha * 1), alpha = 0.1 for high heterogeneity (the paper's
  Dirichlet split) and 10 for low. Backbone family drawn uniformly from 4 families.
- Skill s_i[c] in [0, 1]. Local training pulls it toward a data-driven level
  L_i[c] = cap_i * (floor + (1 - floor) * (1 - exp(-C * h_i[c]))), cap_i ~ U(0.35, 0.85) the
  backbone's capacity (`--cap-range`): strong where the agent has data, near `floor * cap`
  where it has none.
- Distillation (teacher t -> student s): s_s[c] += eta * compat(t, s) * max(0, s_t[c] - s_s[c]);
  compat = 1 for the same family, `cross_family` otherwise (text KD across tokenizers is lossier).
  Then every agent trains locally: s += rho * (L - s), which also slowly forgets borrowed skill.
- Reward (SPEC Eq. 3): gain_scale * (improvement of the student's validation score w_s . s_s)
  - kb_cost * KB_t + noise, with w_s = eval_mix * h_s + (1 - eval_mix) / C (the student's
  validation split mirrors its own data, half of it the global mix) and KB_t ~ U(20, 60) the
  teacher's package size. Its expectation is `utility()`, the only thing the oracle is given.
- Profiles: what a node would publish (knexa_node.profile): family one-hot, 12 performance
  features from its evaluation history (Pass@1 = w . s, CodeBLEU and scaled log-perplexity
  derived from skill, plus deltas, EMA alpha 0.5 and bests) and the data histogram, rounded to
  2 decimals like `sanitize_profile`. Policies never see skills, capacities or compat.

Worlds (`WorldConfig.world`, `knexa-cpm simulate --world`): what makes a pair compatible. Only
"family" uses a pairwise term that is one of the interaction context's features; the others
exist so a matchmaker cannot win just by having that feature:

- family: compat = 1 for the same backbone family, `cross_family` (0.6) otherwise.
- affinity: a latent per-pair affinity. Every agent has a hidden unit "style" vector z_i in R^3;
  compat = 0.25 + 0.75 * ((1 + z_t . z_s) / 2)^2, in [0.25, 1], with no family term. Nothing in
  a profile reveals z.
- tokenizer: a tokenizer-mismatch cost per ordered family pair: compat = 1 - M[f_t, f_s] with
  M = 0 on the diagonal and U(0.1, 0.8) elsewhere, asymmetric (a small vocabulary learns from a
  large one better than the reverse). A same-family flag sees only the diagonal.
- wrong: a quarter of the agents (at least one) are confidently wrong in their three strongest
  data categories: there their packages pull the student's skill down
  (s_s[c] -= eta * compat * harm * s_s[c]) while their own evaluations look normal. Family
  compat as in "family".
- poison: the trust study. An eighth of the agents (at least one) are poisoners: strong-looking
  profiles (capacity at the top of the range) whose packages harm the student in every category.
- mimic: as poison, but every poisoner publishes the profile of the strongest honest agent (an
  imitation attack), so no profile feature tells them apart: only peer ids can.

World-specific draws come from their own stream, so the agents, histograms and noise of one seed
are identical in every world.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from protocol import FAMILIES, FAMILY_SLICE, HIST_SLICE, PERF_SLICE, PROFILE_DIM

__all__ = ["HETEROGENEITY", "WORLDS", "Federation", "SimState", "WorldConfig", "draw_federation",
           "initial_state", "poisoners", "profiles", "step", "utility"]

N_CAT = HIST_SLICE.stop - HIST_SLICE.start
HETEROGENEITY = ("low", "high")
WORLDS = ("family", "affinity", "tokenizer", "wrong", "poison", "mimic")
_EMA = 0.5


@dataclass(frozen=True)
class WorldConfig:
    """Parameters of the generative model (see the module docstring)."""

    n: int
    het: str
    rounds: int = 100
    world: str = "family"
    seed: int = 0
    alpha_high: float = 0.1
    alpha_low: float = 10.0
    families: tuple[str, ...] = ("qwen", "gpt2", "bloom", "gpt_neox")
    cross_family: float = 0.6
    floor: float = 0.1
    cap_low: float = 0.35
    cap_high: float = 0.85
    eta: float = 0.15
    rho: float = 0.05
    eval_mix: float = 0.5
    gain_scale: float = 100.0
    kb_cost: float = 0.005
    noise: float = 1.0
    eval_noise: float = 0.01
    harm: float = 1.0
    wrong_frac: float = 0.25
    wrong_cats: int = 3
    poison_frac: float = 0.125

    def __post_init__(self) -> None:
        if self.n < 2 or self.rounds < 1:
            raise ValueError("need n >= 2 agents and rounds >= 1")
        if self.het not in HETEROGENEITY:
            raise ValueError(f"het must be one of {HETEROGENEITY}, got {self.het!r}")
        if not 0.0 <= self.cap_low <= self.cap_high <= 1.0:
            raise ValueError("need 0 <= cap_low <= cap_high <= 1")
        if any(f not in FAMILIES for f in self.families):
            raise ValueError(f"families must come from {FAMILIES}")
        if self.world not in WORLDS:
            raise ValueError(f"world must be one of {WORLDS}, got {self.world!r}")
        if not 0.0 <= self.cross_family <= 1.0:
            raise ValueError("cross_family must be in [0, 1]")

    @property
    def alpha(self) -> float:
        return self.alpha_high if self.het == "high" else self.alpha_low


@dataclass(frozen=True)
class Federation:
    """The hidden truth of one draw, shared by every policy."""

    cfg: WorldConfig
    hist: np.ndarray  # (N, C) data histograms
    family: np.ndarray  # (N,) index into protocol.FAMILIES
    cap: np.ndarray  # (N,)
    level: np.ndarray  # (N, C) data-driven skill level
    weights: np.ndarray  # (N, C) validation weights w_i
    kb: np.ndarray  # (N,) package size of each teacher
    compat: np.ndarray  # (N, N) teacher x student distillation efficiency
    harmful: np.ndarray  # (N, C) bool: teacher i's packages harm in category c
    shown_as: np.ndarray  # (N,) whose profile agent i publishes (itself, except mimics)
    reward_noise: np.ndarray  # (T, N, N) noise of teacher i -> student j in round t
    eval_noise: np.ndarray  # (T + 1, N, 3) evaluation noise of Pass@1, CodeBLEU, log-ppl


@dataclass
class SimState:
    """One policy's copy of the evolving world."""

    skill: np.ndarray  # (N, C)
    history: list[np.ndarray] = field(default_factory=list)  # (N, 3) evaluations, oldest first


def draw_federation(cfg: WorldConfig) -> Federation:
    """Draw agents and all noise from `cfg.seed` alone (independent of any policy)."""
    rng = np.random.default_rng([cfg.seed, cfg.n, HETEROGENEITY.index(cfg.het), 0x5EED])
    n = cfg.n
    hist = rng.dirichlet(np.full(N_CAT, cfg.alpha), size=n)
    fam_choice = np.array([FAMILIES.index(f) for f in cfg.families])
    family = fam_choice[rng.integers(0, len(fam_choice), n)]
    cap = rng.uniform(cfg.cap_low, cfg.cap_high, n)
    level = cap[:, None] * (cfg.floor + (1 - cfg.floor) * (1 - np.exp(-N_CAT * hist)))
    weights = cfg.eval_mix * hist + (1 - cfg.eval_mix) / N_CAT
    kb = rng.uniform(20.0, 60.0, n)
    compat = np.where(family[:, None] == family[None, :], 1.0, cfg.cross_family)
    reward_noise = rng.normal(0.0, cfg.noise, (cfg.rounds, n, n))
    eval_noise = rng.normal(0.0, cfg.eval_noise, (cfg.rounds + 1, n, 3))
    harmful = np.zeros((n, N_CAT), dtype=bool)
    # the world's own stream: the draws above are the same in every world
    wrng = np.random.default_rng([cfg.seed, cfg.n, HETEROGENEITY.index(cfg.het), WORLDS.index(cfg.world), 0xA11])
    if cfg.world == "affinity":
        z = wrng.normal(size=(n, 3))
        z /= np.linalg.norm(z, axis=1, keepdims=True)
        compat = 0.25 + 0.75 * ((1.0 + z @ z.T) / 2.0) ** 2
    elif cfg.world == "tokenizer":
        mismatch = wrng.uniform(0.1, 0.8, (len(FAMILIES), len(FAMILIES)))
        np.fill_diagonal(mismatch, 0.0)
        compat = 1.0 - mismatch[family[:, None], family[None, :]]
    elif cfg.world == "wrong":
        bad = wrng.choice(n, max(1, round(cfg.wrong_frac * n)), replace=False)
        top = np.argsort(-hist[bad], axis=1)[:, :cfg.wrong_cats]  # confidently wrong where it looks strongest
        harmful[bad[:, None], top] = True
    shown_as = np.arange(n)
    if cfg.world in ("poison", "mimic"):
        bad = wrng.choice(n, max(1, round(cfg.poison_frac * n)), replace=False)
        harmful[bad] = True
        cap = cap.copy()
        cap[bad] = cfg.cap_high
        level = cap[:, None] * (cfg.floor + (1 - cfg.floor) * (1 - np.exp(-N_CAT * hist)))
        if cfg.world == "mimic":
            honest = np.setdiff1d(np.arange(n), bad)
            shown_as[bad] = honest[np.argmax(cap[honest])]
    return Federation(cfg, hist, family, cap, level, weights, kb, compat, harmful, shown_as, reward_noise,
                      eval_noise)


def _delta(fed: Federation, teacher_skill: np.ndarray, student_skill: np.ndarray,
           harmful: np.ndarray) -> np.ndarray:
    """Per-category change of the student before compat and eta: the positive skill gap, or the
    harm where the teacher is wrong (arrays broadcast over pairs)."""
    return np.where(harmful, -fed.cfg.harm * student_skill, np.maximum(teacher_skill - student_skill, 0.0))


def poisoners(fed: Federation) -> np.ndarray:
    """Indices of the agents whose packages harm in every category (the "poison" world)."""
    return np.flatnonzero(fed.harmful.all(axis=1))


def _evaluate(fed: Federation, skill: np.ndarray, t: int) -> np.ndarray:
    """(N, 3): Pass@1, CodeBLEU, scaled log-perplexity, as a node's evaluation would report."""
    pass1 = (fed.weights * skill).sum(axis=1)
    overall = skill.mean(axis=1)
    out = np.stack([pass1, 0.15 + 0.6 * overall, 0.9 - 0.7 * pass1], axis=1) + fed.eval_noise[t]
    return np.clip(out, 0.0, 1.0)


def initial_state(fed: Federation) -> SimState:
    """After the first local epoch: skill at the data-driven level, one evaluation on record."""
    skill = fed.level.copy()
    return SimState(skill, [_evaluate(fed, skill, 0)])


def utility(fed: Federation, state: SimState) -> np.ndarray:
    """(N, N) expected reward of teacher i -> student j in this state (the oracle's input)."""
    s = state.skill
    gap = _delta(fed, s[:, None, :], s[None, :, :], fed.harmful[:, None, :])  # [teacher, student, category]
    gain = fed.cfg.eta * fed.compat * np.einsum("tsc,sc->ts", gap, fed.weights)
    u = fed.cfg.gain_scale * gain - fed.cfg.kb_cost * fed.kb[:, None]
    np.fill_diagonal(u, -np.inf)
    return u


def step(fed: Federation, state: SimState, pairs: list[tuple[int, int]], t: int) -> SimState:
    """Round t's distillation for `pairs`, then everyone's local epoch and evaluation.

    The same rule for every policy; students learn from their teacher's pre-round skill.
    """
    s = state.skill
    new = s.copy()
    if pairs:
        te, st = np.asarray(pairs, dtype=np.int64).T
        new[st] += fed.cfg.eta * fed.compat[te, st][:, None] * _delta(fed, s[te], s[st], fed.harmful[te])
    new += fed.cfg.rho * (fed.level - new)
    np.clip(new, 0.0, 1.0, out=new)
    return SimState(new, [*state.history, _evaluate(fed, new, t + 1)])


def _perf_features(history: list[np.ndarray]) -> np.ndarray:
    """The 12 performance dims of knexa_node.profile for all agents at once."""
    rows = np.stack(history)  # (H, N, 3)
    cur = rows[-1]
    delta = cur - rows[-2] if len(rows) > 1 else np.zeros_like(cur)
    ema = rows[0].copy()
    for r in rows[1:]:
        ema = _EMA * r + (1 - _EMA) * ema
    best = np.stack([rows[..., 0].max(0), rows[..., 1].max(0), rows[..., 2].min(0)], axis=1)
    return np.concatenate([cur, delta, ema, best], axis=1)


def profiles(fed: Federation, state: SimState) -> np.ndarray:
    """(N, 32) profiles in the protocol layout, rounded to 2 decimals like sanitize_profile."""
    n = fed.cfg.n
    p = np.zeros((n, PROFILE_DIM))
    p[np.arange(n), FAMILY_SLICE.start + fed.family] = 1.0
    p[:, PERF_SLICE] = np.round(_perf_features(state.history), 2)
    p[:, HIST_SLICE] = np.round(fed.hist, 2)
    return p[fed.shown_as] + 0.0
