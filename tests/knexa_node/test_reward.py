"""SPEC Eq. 3: r = gamma * (L_pre - L_post) - delta * KB, KB = bytes / 1024."""

from __future__ import annotations

import math

import numpy as np
import pytest

from knexa_node.reward import compute_reward


def test_equation_3() -> None:
    assert compute_reward(2.0, 1.5, 0) == pytest.approx(0.5)
    assert compute_reward(2.0, 1.5, 10 * 1024) == pytest.approx(0.5 - 0.001 * 10)
    assert compute_reward(2.0, 1.5, 2048, gamma=2.0, delta=0.01) == pytest.approx(1.0 - 0.02)
    assert compute_reward(1.0, 1.2, 512) == pytest.approx(-0.2 - 0.0005)


def test_a_useless_big_package_is_negative() -> None:
    assert compute_reward(1.0, 1.0, 1_000_000) < 0


def test_numpy_ints_accepted() -> None:
    assert compute_reward(1.0, 0.5, np.int64(1024)) == pytest.approx(0.5 - 0.001)


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [((math.nan, 1.0, 1), {}), ((1.0, math.inf, 1), {}), ((1.0, 1.0, -1), {}), ((1.0, 1.0, 1.5), {}),
     ((1.0, 1.0, True), {}), ((1.0, 1.0, 1), {"gamma": -1.0}), ((1.0, 1.0, 1), {"delta": math.nan})],
)  # fmt: skip
def test_rejects_what_would_poison_the_bandit(args: tuple, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        compute_reward(*args, **kwargs)
