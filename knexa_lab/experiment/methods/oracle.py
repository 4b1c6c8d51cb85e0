"""Oracle-P2P: the P2P exchange, matched on the clients' true skill gaps. An upper bound, not a method.

Each round it measures every client's greedy Pass@1 per category on a hidden probe set
(``oracle/probe.jsonl`` of a skills split; no node ever reads it) and scores the ordered pair
(teacher t, student s) by what t could teach s: ``sum_c max(0, skill[t, c] - skill[s, c])``.
Pairs are then taken greedily by that score, disjoint, exactly as the CPM takes its UCB scores
(:func:`knexa_cpm.matching.greedy_disjoint`). Everything after the pairing (teacher answers,
guardrail, Eq. 2 steps, counterfactual reward, equal budgets) is :class:`p2p.PeerToPeer`'s, so
the gap between KNEXA-FL and Oracle-P2P is what better matching could still buy.

Not deployable: it needs every client's per-category skills, which no CPM sees. The probe
evaluation is not counted in any budget.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from protocol._layout import CATEGORIES

from .base import RoundContext
from .p2p import PeerToPeer

__all__ = ["OracleP2P", "skill_gain_scores"]

PROBE = Path("oracle") / "probe.jsonl"


def skill_gain_scores(skills: np.ndarray) -> np.ndarray:
    """(N, N) scores[t, s] = sum_c max(0, skills[t, c] - skills[s, c]); the diagonal is -inf."""
    gain = np.clip(skills[:, None, :] - skills[None, :, :], 0.0, None).sum(axis=2)
    np.fill_diagonal(gain, -np.inf)
    return gain


class _SkillOracle:
    """A policy object with the CPM policies' ``select``/``observe`` shape, reading true skills."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.skills: np.ndarray | None = None

    def select(self, profiles: np.ndarray, round_idx: int, k_max: int | None, **_: Any) -> list[tuple[int, int]]:
        from knexa_cpm.matching import greedy_disjoint

        if self.skills is None:
            raise RuntimeError("oracle: skills not measured for this round")
        return greedy_disjoint(skill_gain_scores(self.skills), k_max, self.rng)

    def observe(self, *args: Any, **kwargs: Any) -> None:
        return None  # it learns nothing: it is told

    def state_dict(self) -> dict[str, Any]:
        return {"rng": json.dumps(self.rng.bit_generator.state)}  # 128-bit ints: not msgpack-able

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = json.loads(state["rng"])


class OracleP2P(PeerToPeer):
    name: ClassVar[str] = "oracle-p2p"
    policy_name: ClassVar[str] = "random"  # replaced in setup; kept so settings validate alike

    def setup(self, clients: Any, settings: Any, workdir: Path) -> None:
        super().setup(clients, settings, workdir)
        self.policy = _SkillOracle(int(self.settings["seed"]))
        self.probe: list[dict[str, str]] | None = None

    def communicate(self, ctx: RoundContext) -> dict[int, Any]:
        if self.probe is None:
            from knexa_node.data import read_jsonl

            data_dir = ctx.extras.get("data_dir")
            path = Path(data_dir) / PROBE if data_dir else None
            if path is None or not path.is_file():
                raise RuntimeError(f"oracle-p2p needs a skills split with a hidden probe set ({PROBE}); "
                                   "run it with experiment.problems = \"skills\"")
            self.probe = read_jsonl(path)
        skills = [c.backend.pass_by_category(self.probe) for c in ctx.clients]
        self.policy.skills = np.array([[s.get(c, 0.0) for c in CATEGORIES] for s in skills])
        return super().communicate(ctx)
