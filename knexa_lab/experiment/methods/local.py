"""LocalOnly: every client trains on its own shard and never talks to anyone (the floor)."""

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
        return {}

    def save(self, directory: Path) -> None:
        return None

    def load(self, directory: Path) -> None:
        return None
