"""LocalOnly: every client trains on its own shard and never talks to anyone (the floor).

Each round it takes the same optimizer steps as a P2P client: the local epoch, then the Eq. 2
steps with an empty teacher term (``integrate_local``), so comparisons are at equal budget.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from .base import Client, ClientStep, RoundContext

__all__ = ["LocalOnly"]


class LocalOnly:
    name: ClassVar[str] = "local-only"
    local_training: ClassVar[bool] = True

    def setup(self, clients: Sequence[Client], settings: Mapping[str, Any], workdir: Path) -> None:
        if settings:
            raise ValueError(f"local-only takes no settings, got {sorted(settings)}")

    def communicate(self, ctx: RoundContext) -> dict[int, ClientStep]:
        for c in ctx.clients:
            c.backend.integrate_local(ctx.round_idx, max(ctx.total_rounds, 1))
        return {}

    def save(self, directory: Path) -> None:
        return None

    def load(self, directory: Path) -> None:
        return None
