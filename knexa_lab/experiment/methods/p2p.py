"""The P2P methods: a matchmaker pairs clients, teachers send text answers, students distil.

One class, :class:`PeerToPeer`, runs the learning path of the daemons (``knexa_node.service``
``run_round`` / ``_teach`` / ``_learn`` and ``knexa_cpm.service``) in-process, with the network
taken out and nothing else changed:

1. every client's profile: :func:`knexa_node.profile.build_profile` over its evaluation history
   (``ctx.history``: the evaluations at the end of the previous rounds; empty in round 0, which
   the profile treats as "worst", so round 0 pairs on family and data histogram only), then
   :func:`~knexa_node.profile.sanitize_profile` exactly as the node sends it;
2. the CPM's policy (:func:`knexa_cpm.policies.make_policy`) picks disjoint ordered
   (teacher, student) pairs from the profile matrix, rows in client order;
3. teacher: ``generate_answers(transfer_prompts())`` then ``filter_outgoing`` (guardrail);
4. student: ``learn`` (SPEC Eq. 2 with and without the teacher's term), reward by
   :func:`knexa_node.reward.compute_reward` (Eq. 3, dL = counterfactual minus real validation
   loss) over the package's wire size
   (:func:`base.package_bytes`; the daemons' sealed package adds ~100 bytes), and
   ``policy.observe(teacher_profile, student_profile, reward)`` as the CPM does on a reward report;
5. every client that was not a student takes the same Eq. 2 steps without a teacher
   (``integrate_local``), so budgets are equal across roles and methods.

Subclasses only choose the policy: ``random-p2p`` (uniform random pairs), ``heuristic-p2p``
(supplement Alg. 3), ``knexa-fl`` (LinUCB, interaction context, our default) and
``knexa-fl-concat`` (LinUCB on the paper's concatenated ``[p_i, p_j]``), ``knexa-fl-hybrid`` (the
CPM's hybrid policy), ``knexa-fl-skills`` (hybrid, with nodes that share their validation
Pass@1 per category, ``share_skills``), ``knexa-fl-compact`` (the same with the compact hybrid:
five pair terms), ``knexa-fl-prior`` (compact, with a prior that the skill gap pays),
``knexa-fl-prior-greedy`` (the same without the Thompson draw), ``knexa-fl-prior-adaptive``
(the same with teacher effects whose spread is learned from the rewards) and
``skill-gap-p2p`` (no learning: matched on the shared skill gaps). ``[methods.<name>]``
may override any key of :data:`SETTINGS`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from knexa_cpm.config import CpmSection
from knexa_node.config import NodeSection

from .base import Client, ClientStep, RoundContext, package_bytes

__all__ = ["SETTINGS", "HeuristicP2P", "KnexaFL", "KnexaFLCompact", "KnexaFLConcat", "KnexaFLHybrid", "KnexaFLPrior",
           "KnexaFLPriorAdaptive", "KnexaFLPriorGreedy", "KnexaFLSkills", "SkillGapP2P",
           "PeerToPeer", "RandomP2P", "policy_seed"]

logger = logging.getLogger(__name__)

_CPM = CpmSection()
_NODE = NodeSection()
#: every setting a P2P method accepts, with the daemons' defaults
SETTINGS: dict[str, Any] = {
    # matchmaker (knexa_cpm.policies.make_policy); seed None = derived from the clients' seeds
    "policy": None, "context": None, "lam": _CPM.lam, "beta0": _CPM.beta0, "beta_decay": 0.05,
    "beta_schedule": "inv_sqrt", "trust_weight": 0.0, "trust_rate": 0.2, "seed": None,
    # hybrid only: the skill prior and the early reward scale (knexa_cpm.hybrid)
    "skill_prior": _CPM.skill_prior, "reward_scale": _CPM.reward_scale, "explore": _CPM.explore,
    "adaptive_effects": _CPM.adaptive_effects,
    # pairs per round (0 = floor(N/2), the CPM's default)
    "k_max": 0,
    # node side: Eq. 3 weights and profile sanitization
    "gamma": _NODE.reward_gamma, "delta": _NODE.reward_delta,
    "profile_decimals": _NODE.profile_decimals, "profile_epsilon": _NODE.profile_epsilon,
    # the node also sends its validation Pass@1 per category (Profile.skills; hybrid uses it)
    "share_skills": _NODE.share_skills,
}  # fmt: skip
_STATE_DIR = "policy"


def policy_seed(client_seeds: Sequence[int]) -> int:
    """The matchmaker's seed for one experiment seed: a function of all clients' seeds, so every
    seed of an experiment draws different random pairs and tie-breaks (the daemons mode passes
    the same value to ``knexa-cpm serve``)."""
    return int(np.random.SeedSequence([int(s) for s in client_seeds]).generate_state(1)[0])


class PeerToPeer:
    """See the module docstring. Instances live for one (method, seed) run."""

    name: ClassVar[str] = "p2p"
    local_training: ClassVar[bool] = True
    policy_name: ClassVar[str] = "linucb"
    context: ClassVar[str] = "interaction"
    #: this method's own defaults for SETTINGS keys (a preset's table still wins)
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self) -> None:
        self.policy: Any = None
        self.peer_ids: list[str] = []
        self.settings: dict[str, Any] = {}

    def setup(self, clients: Sequence[Client], settings: Mapping[str, Any], workdir: Path) -> None:
        from knexa_cpm.policies import make_policy

        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            raise ValueError(f"{self.name}: unknown settings {unknown}; known: {', '.join(SETTINGS)}")
        s = {**SETTINGS, **self.defaults, **settings}
        s["policy"] = s["policy"] or self.policy_name
        s["context"] = s["context"] or self.context
        s["seed"] = policy_seed([c.seed for c in clients]) if s["seed"] is None else int(s["seed"])
        if not isinstance(s["adaptive_effects"], bool):  # bool("false") would be True
            raise ValueError(f"{self.name}: adaptive_effects must be true or false, got {s['adaptive_effects']!r}")
        self.settings = s
        self.policy = make_policy(s["policy"], context=s["context"], lam=float(s["lam"]), beta0=float(s["beta0"]),
                                  beta_decay=float(s["beta_decay"]), seed=s["seed"],
                                  beta_schedule=s["beta_schedule"], trust_weight=float(s["trust_weight"]),
                                  trust_rate=float(s["trust_rate"]), skill_prior=float(s["skill_prior"]),
                                  reward_scale=float(s["reward_scale"]), explore=float(s["explore"]),
                                  adaptive_effects=s["adaptive_effects"])

    def profiles(self, ctx: RoundContext) -> np.ndarray:
        """Sanitized profile rows in client order, as each node would send them: (N, 32), or
        (N, 44) with the skills each node shares (`knexa_cpm.policies.profile_row`)."""
        from knexa_cpm.policies import profile_row
        from knexa_node.profile import (
            PerfPoint,
            build_profile,
            sanitize_profile,
            sanitize_skills,
            skills_vector,
        )

        eps = float(self.settings["profile_epsilon"]) or None
        decimals = int(self.settings["profile_decimals"])
        rows = []
        for c in ctx.clients:
            # the node's rule: a diverged model is reported as "worst", never as NaN
            history = [PerfPoint(pass_at_1=ev.pass_at_1 if math.isfinite(ev.pass_at_1) else 0.0,
                                 codebleu=ev.codebleu if math.isfinite(ev.codebleu) else 0.0,
                                 perplexity=ev.perplexity if math.isfinite(ev.perplexity) else float("inf"))
                       for ev in ctx.history.get(c.index, ())]
            raw = build_profile(c.backend.family, history, c.backend.category_histogram())
            vector = sanitize_profile(raw, decimals=decimals, epsilon=eps, rng=ctx.rng)
            if self.settings["share_skills"]:  # the node's second release (knexa_node.service)
                skills = sanitize_skills(skills_vector(c.backend.validation_skills()[1]), decimals=decimals,
                                         epsilon=eps, rng=ctx.rng)
                vector = np.asarray(profile_row(vector, skills))
            rows.append(vector)
        return np.stack(rows)

    def communicate(self, ctx: RoundContext) -> dict[int, ClientStep]:
        from knexa_node.reward import compute_reward

        clients = list(ctx.clients)
        profiles = self.profiles(ctx)
        k_max = int(self.settings["k_max"]) or None
        # trust scores and identity effects key on client names, as the CPM keys on peer ids
        self.peer_ids = [c.name for c in clients]
        pairs = self.policy.select(profiles, ctx.round_idx, k_max, peer_ids=self.peer_ids)
        steps: dict[int, ClientStep] = {}
        for t, s in pairs:
            teacher, student = clients[t], clients[s]
            tb, sb = teacher.backend, student.backend
            answers = tb.generate_answers(tb.transfer_prompts())
            kept, guard = tb.filter_outgoing(answers)
            nbytes = package_bytes(kept)
            steps[teacher.index] = ClientStep(role="teacher", partner=student.name, bytes_sent=nbytes)
            learned = sb.learn(kept, ctx.round_idx, max(ctx.total_rounds, 1))
            kd, loss_without, loss_post = learned.report, learned.loss_without, learned.loss_with
            reward = None
            if math.isfinite(loss_without) and math.isfinite(loss_post):
                # Eq. 3 with the teacher-attributable dL (counterfactual minus real; docs/method.md)
                reward = compute_reward(loss_without, loss_post, nbytes, gamma=float(self.settings["gamma"]),
                                        delta=float(self.settings["delta"]))
                self.observe(t, s, profiles, reward)
            else:  # the node reports no reward then, so the bandit learns nothing from it
                logger.warning("%s round=%d %s: non-finite validation loss (%s without the teacher, %s with); "
                               "no reward", self.name, ctx.round_idx, student.name, loss_without, loss_post)
            steps[student.index] = ClientStep(
                role="student", partner=teacher.name, reward=reward, bytes_received=nbytes,
                kd_loss=kd.mean_loss if kd.steps and math.isfinite(kd.mean_loss) else None)
            logger.info("%s round=%d %s -> %s items=%d blocked=%d bytes=%d loss %.4f -> %.4f reward=%s",
                        self.name, ctx.round_idx, teacher.name, student.name, len(kept), guard.blocked, nbytes,
                        loss_without, loss_post, "none" if reward is None else f"{reward:+.4f}")
        for c in clients:  # equal budgets: the same Eq. 2 steps, without a teacher, for non-students
            if steps.get(c.index, ClientStep()).role != "student":
                c.backend.integrate_local(ctx.round_idx, max(ctx.total_rounds, 1))
        return steps

    def observe(self, teacher: int, student: int, profiles: np.ndarray, reward: float) -> None:
        """Feed one reward to the matchmaker, as the CPM does on a reward report."""
        ids = self.peer_ids
        self.policy.observe(profiles[teacher], profiles[student], reward,
                            teacher_id=ids[teacher] if ids else None, student_id=ids[student] if ids else None)

    def save(self, directory: Path) -> None:
        from knexa_cpm.state import save_state

        save_state(Path(directory) / _STATE_DIR, {"policy": self.policy.state_dict(), "settings": self.settings})

    def load(self, directory: Path) -> None:
        """Restore the matchmaker (bandit, reward statistics, RNG) saved after a round.

        Raises:
            ValueError: no saved policy there, or it belongs to another policy/context.
        """
        from knexa_cpm.state import load_state

        state = load_state(Path(directory) / _STATE_DIR)
        if state is None:
            raise ValueError(f"{self.name}: no saved policy in {directory}")
        self.policy.load_state_dict(state["policy"])


class RandomP2P(PeerToPeer):
    name: ClassVar[str] = "random-p2p"
    policy_name: ClassVar[str] = "random"


class HeuristicP2P(PeerToPeer):
    name: ClassVar[str] = "heuristic-p2p"
    policy_name: ClassVar[str] = "heuristic"


class KnexaFL(PeerToPeer):
    name: ClassVar[str] = "knexa-fl"
    policy_name: ClassVar[str] = "linucb"
    context: ClassVar[str] = "interaction"


class KnexaFLHybrid(PeerToPeer):
    name: ClassVar[str] = "knexa-fl-hybrid"
    policy_name: ClassVar[str] = "hybrid"


class KnexaFLSkills(PeerToPeer):
    """The hybrid matchmaker with nodes that share their validation Pass@1 per category."""

    name: ClassVar[str] = "knexa-fl-skills"
    policy_name: ClassVar[str] = "hybrid"
    defaults: ClassVar[dict[str, Any]] = {"share_skills": True}


class KnexaFLCompact(PeerToPeer):
    """knexa-fl-skills with the compact hybrid (five pair terms): for federations with few rewards."""

    name: ClassVar[str] = "knexa-fl-compact"
    policy_name: ClassVar[str] = "hybrid"
    context: ClassVar[str] = "compact"
    defaults: ClassVar[dict[str, Any]] = {"share_skills": True}


class KnexaFLPrior(PeerToPeer):
    """knexa-fl-compact whose skill-gap coefficient starts at a prior mean (knexa_cpm.hybrid):
    the first rounds pair by shared skill gaps, the rewards take over as they come in.

    The values: 0.01 reward per teachable category is the order of the skill-gap coefficients
    that knexa-fl-skills learned on the skills benchmark (0.002-0.021, docs/skills.md), and
    0.1 nats the order of a KD step's validation-loss change (rewards' sd 0.08 there); both are
    reward units, not a fit to any one run."""

    name: ClassVar[str] = "knexa-fl-prior"
    policy_name: ClassVar[str] = "hybrid"
    context: ClassVar[str] = "compact"
    defaults: ClassVar[dict[str, Any]] = {"share_skills": True, "skill_prior": 0.01, "reward_scale": 0.1}


class KnexaFLPriorGreedy(KnexaFLPrior):
    """knexa-fl-prior without the Thompson draw (explore 0): each round the posterior mean's best
    matching. Round 0 is then the skill-gap matching itself, and only evidence moves it away;
    on the skills benchmark the draw's exploration cost more than it found (docs/skills.md)."""

    name: ClassVar[str] = "knexa-fl-prior-greedy"
    defaults: ClassVar[dict[str, Any]] = {**KnexaFLPrior.defaults, "explore": 0.0}


class KnexaFLPriorAdaptive(KnexaFLPrior):
    """knexa-fl-prior whose teacher effects' spread is estimated from the rewards (empirical
    Bayes, `adaptive_effects`) instead of fixed: designed after knexa-fl-prior lost to the skill
    prior alone on the skills benchmark, where its fixed-spread teacher effects followed the
    reward noise and drew exploration as large as 1.5 teachable categories (docs/skills.md)."""

    name: ClassVar[str] = "knexa-fl-prior-adaptive"
    defaults: ClassVar[dict[str, Any]] = {**KnexaFLPrior.defaults, "adaptive_effects": True}


class SkillGapP2P(PeerToPeer):
    """No learning: whole-round matching on the skill gaps the nodes share (the ablation of
    knexa-fl-prior's learning)."""

    name: ClassVar[str] = "skill-gap-p2p"
    policy_name: ClassVar[str] = "skill_gap"
    defaults: ClassVar[dict[str, Any]] = {"share_skills": True}


class KnexaFLConcat(PeerToPeer):
    name: ClassVar[str] = "knexa-fl-concat"
    policy_name: ClassVar[str] = "linucb"
    context: ClassVar[str] = "concat"
