"""FedAvg of LoRA adapters within same-architecture groups (McMahan et al. 2017, on adapters).

Only clients running the same base model can average adapters: LoRA matrices of different
architectures have different names and shapes, and even equal shapes over different frozen
bases would mean different things. So the federation splits into groups by model (the
``model`` column: same alias, path or hub id); each group's adapters are replaced by their
average weighted by training-set size; a client alone in its group keeps its adapter (role
``local``, no bytes). Optimiser states stay per client.

Bytes: each group member uploads its adapter and downloads the average, both the size of the
adapter's tensors (``bytes_sent`` = ``bytes_received`` = that size).

``[methods.fedavg] groups = [[0, 4], [1, 5]]`` replaces the grouping by client indices (clients in
no group keep their adapters); a group that mixes architectures is refused with
:class:`ArchitectureMismatch` at setup.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from .base import Client, ClientStep, RoundContext

__all__ = ["ArchitectureMismatch", "FedAvg", "adapter_bytes", "average_adapters"]

logger = logging.getLogger(__name__)


class ArchitectureMismatch(ValueError):
    """Adapters of different architectures (or bases) cannot be averaged."""


def _describe(c: Client) -> str:
    return f"{c.name} ({c.backend.model_name}, {c.backend.loaded.model_type})"


def _check_same_architecture(clients: Sequence[Client], states: Sequence[Mapping[str, torch.Tensor]]) -> None:
    first, ref = clients[0], states[0]
    for c, st in zip(clients[1:], states[1:], strict=True):
        if c.backend.model_name != first.backend.model_name:
            raise ArchitectureMismatch(f"FedAvg averages adapters of one model only: {_describe(first)} and "
                                       f"{_describe(c)} differ (group clients by model)")
        if set(st) != set(ref) or any(st[k].shape != ref[k].shape for k in ref):
            raise ArchitectureMismatch(f"FedAvg: adapters of {first.name} and {c.name} have different "
                                       "tensor names or shapes (different LoRA settings?)")


def adapter_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Size of an adapter's tensors as they would travel (raw tensor bytes)."""
    return int(sum(t.numel() * t.element_size() for t in state.values()))


def average_adapters(clients: Sequence[Client], weights: Sequence[float] | None = None) -> int:
    """Replace every client's LoRA adapter by the weighted average of all of theirs.

    Args:
        clients: two or more clients on the same base model.
        weights: one non-negative weight per client (default: training-set sizes).
    Returns:
        The adapter size in bytes (what each client uploads and downloads).
    Raises:
        ArchitectureMismatch: the clients run different models or LoRA layouts.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    if len(clients) < 2:
        raise ValueError("averaging needs at least two clients")
    states = [get_peft_model_state_dict(c.backend.model) for c in clients]
    _check_same_architecture(clients, states)
    w = [float(len(c.backend.data.train)) for c in clients] if weights is None else [float(x) for x in weights]
    if len(w) != len(clients) or min(w) < 0 or sum(w) <= 0:
        raise ValueError(f"need one non-negative weight per client with a positive sum, got {w}")
    total = sum(w)
    avg = {k: sum((wi / total) * st[k].detach().float() for wi, st in zip(w, states, strict=True))
           for k in states[0]}
    for c, st in zip(clients, states, strict=True):
        result = set_peft_model_state_dict(c.backend.model, {k: v.to(st[k].dtype) for k, v in avg.items()})
        if getattr(result, "unexpected_keys", None):
            raise ArchitectureMismatch(f"{c.name}: unexpected adapter keys {result.unexpected_keys[:3]}")
    return adapter_bytes(states[0])


class FedAvg:
    name: ClassVar[str] = "fedavg"
    local_training: ClassVar[bool] = True

    def __init__(self) -> None:
        self.groups: list[list[int]] = []

    def setup(self, clients: Sequence[Client], settings: Mapping[str, Any], workdir: Path) -> None:
        unknown = sorted(set(settings) - {"groups"})
        if unknown:
            raise ValueError(f"fedavg: unknown settings {unknown}; known: groups")
        by_index = {c.index: c for c in clients}
        if "groups" in settings:
            groups = [[int(i) for i in g] for g in settings["groups"]]
            flat = [i for g in groups for i in g]
            if len(flat) != len(set(flat)) or not set(flat) <= set(by_index):
                raise ValueError(f"fedavg: groups {groups} must be disjoint lists of client indices "
                                 f"{sorted(by_index)}")
        else:
            by_model: dict[str, list[int]] = {}
            for c in clients:
                by_model.setdefault(c.backend.model_name, []).append(c.index)
            groups = list(by_model.values())
        for g in groups:  # refuse mixed groups now, not after a round of training
            members = [by_index[i] for i in g]
            if len(members) > 1:
                from peft import get_peft_model_state_dict

                _check_same_architecture(members, [get_peft_model_state_dict(c.backend.model) for c in members])
        self.groups = [g for g in groups if len(g) > 1]
        logger.info("fedavg groups: %s", self.groups or "none (every client alone: FedAvg = local-only)")

    def communicate(self, ctx: RoundContext) -> dict[int, ClientStep]:
        for c in ctx.clients:  # the P2P methods' Eq. 2 steps without a teacher: equal budgets
            c.backend.integrate_local(ctx.round_idx, max(ctx.total_rounds, 1))
        return self.aggregate(ctx.clients)

    def aggregate(self, clients: Sequence[Client]) -> dict[int, ClientStep]:
        """Average the adapters within each same-model group (the collaboration itself)."""
        by_index = {c.index: c for c in clients}
        steps: dict[int, ClientStep] = {}
        for g in self.groups:
            size = average_adapters([by_index[i] for i in g])
            for i in g:
                steps[i] = ClientStep(role="aggregated", partner=None, bytes_sent=size, bytes_received=size)
        return steps

    def save(self, directory: Path) -> None:
        return None  # stateless: the groups follow from the clients and settings

    def load(self, directory: Path) -> None:
        return None
