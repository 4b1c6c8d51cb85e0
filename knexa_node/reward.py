"""The student's reward for one exchange (SPEC Eq. 3), reported to the CPM with the pair context.

``r = gamma * (L_pre - L_post) - delta * KB``: the drop of the student's validation loss across
the distillation step, minus a communication penalty in kilobytes (KB = bytes / 1024) of the
knowledge package received. Positive when the package helped more than it cost. The CPM
z-normalises rewards itself, so no scaling happens here.
"""

from __future__ import annotations

import math
import operator

__all__ = ["compute_reward"]


def compute_reward(
    loss_pre: float,
    loss_post: float,
    package_bytes: int,
    *,
    gamma: float = 1.0,
    delta: float = 0.001,
) -> float:
    """SPEC Eq. 3: ``gamma * (loss_pre - loss_post) - delta * package_bytes / 1024``.

    Args:
        loss_pre: student's validation loss before integrating the package.
        loss_post: the same loss after the AKD step.
        package_bytes: size of the package as received (ciphertext), >= 0.
        gamma, delta: weights of the loss drop and of the per-KB cost, both >= 0.
    Raises:
        ValueError: a non-finite loss or weight (a NaN reward would poison the CPM's bandit
            statistics for every later round), negative bytes or weights.
    """
    for name, value in (("loss_pre", loss_pre), ("loss_post", loss_post), ("gamma", gamma),
                        ("delta", delta)):  # fmt: skip
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")
    if gamma < 0 or delta < 0:
        raise ValueError(f"gamma and delta must be >= 0, got gamma={gamma}, delta={delta}")
    try:
        size = operator.index(package_bytes)  # ints and numpy integers, not floats or bools
    except TypeError:
        size = -1
    if isinstance(package_bytes, bool) or size < 0:
        raise ValueError(f"package_bytes must be a non-negative int, got {package_bytes!r}")
    return float(gamma * (loss_pre - loss_post) - delta * (size / 1024.0))
