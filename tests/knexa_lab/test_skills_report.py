"""The skills report's diagnostics, on hand-made rows whose answer is known."""

from __future__ import annotations

from pathlib import Path

import pytest

from knexa_lab.experiment.report import Experiment
from knexa_lab.experiment.skills_report import reward_signal


def _exp(rows: list[dict]) -> Experiment:
    return Experiment(directory=Path("."), rows=tuple(rows), methods=("m",), rounds=4, seeds=(1, 2),
                      clients=("client-0", "client-1"), models={})


def _row(seed: int, rnd: int, client: str, pass1: float, role: str = "student", reward: float | None = 0.0) -> dict:
    return {"method": "m", "seed": seed, "round": rnd, "client": client, "pass_at_1": pass1, "role": role,
            "reward": reward}


def test_reward_signal_is_the_rank_correlation_of_rewards_with_the_students_next_gain() -> None:
    rows = [_row(1, 0, "client-0", 0.10), _row(2, 0, "client-0", 0.10)]
    gains = [0.05, -0.02, 0.20, 0.01]  # the student's test Pass@1 change, round by round
    for rnd, g in enumerate(gains, start=1):
        prev = rows[-2]["pass_at_1"]
        rows.append(_row(1, rnd, "client-0", prev + g, reward=10 * g))   # seed 1: rewards follow the gains
        rows.append(_row(2, rnd, "client-0", prev + g, reward=-10 * g))  # seed 2: rewards oppose them
    # teachers' rows, and a student with no row before it, say nothing about the reward
    rows += [_row(1, 2, "client-1", 0.9, role="teacher", reward=None), _row(1, 4, "client-1", 0.0, reward=5.0)]
    assert reward_signal(_exp(rows), "m") == pytest.approx({1: 1.0, 2: -1.0})


def test_reward_signal_leaves_out_seeds_it_cannot_rank() -> None:
    rows = [_row(1, r, "client-0", 0.1 * r, reward=1.0) for r in range(4)]  # constant reward
    rows += [_row(2, r, "client-0", 0.1 * r, reward=float(r)) for r in range(2)]  # one ranked pair only
    assert reward_signal(_exp(rows), "m") == {}
